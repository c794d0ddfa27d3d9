"""The paper's evaluation (section 6): benchmark, metrics, LAR-Gen and baseline rows, report.

`largen eval build|run|report` (docs/evaluation.md). Modules: `benchmark` (the cases and their
images), `metrics` (CLIP-I, CLIP-T, DINO-I, background preservation), `rows` (what each table row
runs), `harness` (resumable, sharded runs), `report` (results.parquet, summary.json, table.md,
figures), `cli`, `tiny_models` (the tiny Paint-by-Example and DINO checkpoints). Nothing imports
this package; it imports `inference` and `dataengine`.
"""
