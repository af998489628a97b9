"""The procedures of SPEC §5 (Fig 3 set-up, failover, failback, recovery, the Fig 17 reaction),
above the `System`: each figure is one `figN_...` function that checks its preconditions first and
logs its steps in a `StepLog` (ARCHITECTURE.md maps figure -> function).
"""
