"""featurepipe's scripts, by kind: bench/ (timings), studies/ (the measurements behind docs/design.md),
checks/ (acceptance checks on real data or a GPU). Each runs from the repository root as a module,
`python -m scripts.<kind>.<name>` (benchmarks: `python -m scripts.bench <name>`), so that it imports
this checkout's featurepipe, with no path set by hand. setup.sh and demo.sh are shell."""
