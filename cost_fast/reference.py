"""Renamed: the straightforward COST that checks the fast engine is ``cost_fast.yardstick``.

Importing this module raises an ``ImportError`` that names the new module and names, so that a
script written for the first release says what to change instead of failing without a word."""

raise ImportError(
    "cost_fast.reference was renamed cost_fast.yardstick: ReferenceCOST is now YardstickCOST, "
    "reference_teleport is yardstick_teleport and reference_task_gradients is yardstick_task_gradients"
)
