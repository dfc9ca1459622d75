"""The paper's experiments as one suite: ``ctrl-csc-repro`` (or ``python -m ctrl_csc.repro``).

:mod:`~ctrl_csc.repro.suite` defines the runs (rows) and how a scale turns them into Hydra
configs, :mod:`~ctrl_csc.repro.runner` runs them as Hydra sweeps, :mod:`~ctrl_csc.repro.report`
writes the tables, figures and verdicts.
"""

from ctrl_csc.repro.suite import SCALES, Evaluation, Row, evaluations, rows

__all__ = ["SCALES", "Evaluation", "Row", "evaluations", "rows"]
