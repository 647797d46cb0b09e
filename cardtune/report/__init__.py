"""``report.html``: one self-contained page about a run (inline CSS and SVG, no script, no
external asset), written at the end of every run and rebuilt by ``cardtune report RUN_DIR``.

- :mod:`~cardtune.report.run`: the sections, from the files the run wrote;
- :mod:`~cardtune.report.charts`: SVG line charts and heatmaps, series cut to a bounded size;
- :mod:`~cardtune.report.labels`: the label view (as ``cardtune inspect``), also alone with
  ``cardtune inspect --html FILE``;
- :mod:`~cardtune.report.page`: the page and its style.

Layer: above ``training/`` (it reads a run's folder as ``training.output`` does), below
``commands/`` and ``train.py``.
"""
