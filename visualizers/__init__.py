"""Renderers that read traces (twotower.trace.Trace) and never the model.

- trajectory: compact JSON of every step for the browser's token grid (assets/grid.js)
- plots:      plotly figures: unmasking order, confidence over steps, planned vs actual
- attention:  cross-attention heatmaps of block queries over context keys, per step
- race:       AR vs diffusion lanes, table and tokens-over-time plot
- failures:   low-confidence commits, flips, repeats, end-of-text floods
- export:     a standalone HTML page of a run; compact trace JSON
"""
