"""What ``research/testbed.py`` and the studies beside it share: the testbed's configurations
beyond ``ctopd demo``'s (:mod:`.settings`), the learning-rate sweep, the SimCT space ablation and
the budget calibration (:mod:`.studies`), paired bootstrap comparisons (:mod:`.compare`) and
their tables (:mod:`.report`). Imports ``ctopd``; the package never imports this."""
