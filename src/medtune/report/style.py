"""The report page's style sheet: readable from a phone (one column, tables that scroll sideways) to a desktop."""

CSS = """
:root { --fg: #1d232b; --muted: #5b6570; --line: #d9dee4; --bg: #fff; --panel: #f5f7f9; --warn: #8a4b00;
  --c0: #2f6db5; --c1: #d0701c; --c2: #2e8b57; --c3: #b23a48; --c4: #7b55b5; --c5: #6b7b8c; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: var(--bg); font: 15px/1.45 system-ui, -apple-system, "Segoe UI",
  Roboto, "DejaVu Sans", sans-serif; }
header, main, footer { max-width: 1100px; margin: 0 auto; padding: 0 16px; }
header { padding-top: 16px; }
h1 { font-size: 1.5em; margin: 0 0 8px; overflow-wrap: anywhere; }
h2 { font-size: 1.25em; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.05em; margin: 18px 0 8px; }
.disclaimer { background: #fff4e5; border-left: 4px solid #e0a040; padding: 8px 12px; margin: 8px 0; }
nav { display: flex; flex-wrap: wrap; gap: 6px 14px; padding: 8px 0; border-bottom: 1px solid var(--line); }
nav a { color: var(--c0); text-decoration: none; }
nav a:hover { text-decoration: underline; }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; margin: 6px 0 12px; }
table { border-collapse: collapse; font-size: 0.92em; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: var(--panel); font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td pre { margin: 0; max-width: 46em; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.95em; }
code { font: 0.9em ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap: anywhere; }
code.hash { word-break: break-all; font-size: 0.8em; }
code.file { white-space: nowrap; }
pre { background: var(--panel); padding: 10px; overflow-x: auto; font-size: 0.85em; }
dl.facts { display: grid; grid-template-columns: minmax(10em, max-content) 1fr; gap: 3px 16px; margin: 8px 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
.note { color: var(--muted); }
.warn { color: var(--warn); }
details { margin: 6px 0; }
summary { cursor: pointer; color: var(--c0); }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 480px), 1fr)); gap: 12px; }
figure.chart { margin: 8px 0; }
figure.chart figcaption { font-weight: 600; font-size: 0.92em; margin-bottom: 2px; }
figure.chart svg { width: 100%; height: auto; display: block; }
svg text { font: 13px system-ui, "DejaVu Sans", sans-serif; fill: var(--muted); }
svg text.title { fill: var(--fg); }
svg .grid { stroke: var(--line); stroke-width: 1; }
svg .axis { stroke: var(--muted); stroke-width: 1; }
svg .line { fill: none; stroke-width: 2; }
svg .whisker { stroke: var(--fg); stroke-width: 1.2; fill: none; }
svg .marker { stroke: var(--fg); stroke-width: 1.5; stroke-dasharray: 5 4; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 0.85em; color: var(--muted); }
.legend i { display: inline-block; width: 12px; height: 12px; margin-right: 5px; vertical-align: -1px; }
.legend i.baseline { height: 0; border-top: 2px dashed var(--fg); vertical-align: 3px; }
svg .s0 { stroke: var(--c0); } svg .s1 { stroke: var(--c1); } svg .s2 { stroke: var(--c2); }
svg .s3 { stroke: var(--c3); } svg .s4 { stroke: var(--c4); } svg .s5 { stroke: var(--c5); }
svg rect.s0, svg circle.s0, .legend i.s0 { fill: var(--c0); background: var(--c0); }
svg rect.s1, svg circle.s1, .legend i.s1 { fill: var(--c1); background: var(--c1); }
svg rect.s2, svg circle.s2, .legend i.s2 { fill: var(--c2); background: var(--c2); }
svg rect.s3, svg circle.s3, .legend i.s3 { fill: var(--c3); background: var(--c3); }
svg rect.s4, svg circle.s4, .legend i.s4 { fill: var(--c4); background: var(--c4); }
svg rect.s5, svg circle.s5, .legend i.s5 { fill: var(--c5); background: var(--c5); }
svg rect.bar { stroke: none; }
footer { color: var(--muted); font-size: 0.85em; margin-top: 32px; padding-bottom: 24px;
  border-top: 1px solid var(--line); }
@media (max-width: 600px) {
  body { font-size: 14px; }
  dl.facts { grid-template-columns: minmax(6em, 45%) 1fr; gap: 3px 10px; }
  svg text { font-size: 17px; }
}
"""
