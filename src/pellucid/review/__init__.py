"""Clinician review study: a blinded web app in which clinicians read cases, see the model's
prediction and then explanations under neutral letters, and rate them; the ratings land in a
database (SQLite by default, PostgreSQL supported) and are analysed next to the benchmark.

- ``create``: build a study from a benchmark run (cases, predictions, maps, raters' invitations);
- ``app``: the FastAPI server (server-rendered pages, tokens hashed, CSRF on every form);
- ``analysis``: ratings with bootstrap CIs, decision accuracy per stage with exact McNemar tests,
  Krippendorff's alpha and Fleiss' kappa, Spearman correlation with the benchmark's metrics.
"""
