"""The procedures of SPEC §5 (Fig 3 set-up, failover, failback, recovery), above the `System`.

Importing the package installs the Fig 17 reaction (switch the sync copy source to B when volume A
fails during a write, [0119]-[0126]) as the `System`'s answer to a failed mirror member: the System
sits below the procedures and must not import them, so the layer above hands it down. Every opener
of a System for application writes (the CLI, the site daemon, lab targets) imports this package.
"""

from vstore.lab.system import System
from vstore.procedures.failover import fig17_switch_sync_source

System.volume_failure_reaction = fig17_switch_sync_source
