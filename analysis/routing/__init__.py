"""Expert-routing analysis (`moedit analyze routing`, docs/routing_analysis.md).

Modules: `metrics` (pure metric functions on counts), `sources` (a run directory's routing
logs), `accumulate` (on-the-fly counters of per-token routing), `probe` (offline probe of a
checkpoint), `trace` (compact per-token traces), `report` and `plots` (JSON/Markdown/HTML
report and its figures), `synthetic` (synthetic run directories for tests and demos) and
`cli` (the subcommand). Import the module you need; nothing is imported here.
"""
