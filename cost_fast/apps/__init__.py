"""The applications built on the library: the ``cost-fast`` command line (``cli``) and its
commands (``demo``, ``toy``, ``reproduce``, ``profile``), and the report folders they write
(``report``)."""
