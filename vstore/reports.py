"""Read-only reports of an open lab: the status document, the dashboard snapshot and verify."""
