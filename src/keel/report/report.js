/* keel report: draws the timeline specs embedded in #keel-data with plotly.js (inlined above this script).
 * Series travel as base64 float32 values with start/stride (or base64) steps; each chart shows a
 * min/max-downsampled view of the
 * visible range (extremes kept) and is re-sampled from the full series on every zoom, so a 100k-step run
 * stays responsive and a one-step spike is never lost. Zoom is shared by all charts. */
(function () {
  "use strict";
  var state = window.__keel;
  var data = JSON.parse(document.getElementById("keel-data").textContent);
  var BUCKETS = 1200;
  var SEVERITY = {info: {color: "#9e9e9e", symbol: "circle-open", size: 7},
                  warning: {color: "#f0a500", symbol: "triangle-up", size: 11},
                  critical: {color: "#c00000", symbol: "x", size: 11}};

  function decode(b64, Kind) {
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Kind(bytes.buffer);
  }
  var series = {};
  function steps(s) {
    if (s.steps !== undefined) return decode(s.steps, s.steps_dtype === "f8" ? Float64Array : Int32Array);
    var x = new Float64Array(s.n);
    for (var i = 0; i < s.n; i++) x[i] = s.start + i * s.stride;  // evenly spaced: sent as start/stride
    return x;
  }
  data.series.forEach(function (s) {
    series[s.run + "\u0000" + s.key] = {x: steps(s), y: decode(s.values, Float32Array)};
  });
  function get(run, key) { return series[run + "\u0000" + key]; }
  // Run names, signal keys and titles come from the stores, and plotly draws its texts as pseudo-HTML (<br>,
  // <b>, <a href> …): they go in as character references, which plotly shows as text. "%" too, or a key
  // holding "%{x}" would be filled in by a hovertemplate.
  function esc(s) {
    return String(s).replace(/[&<>"'%]/g, function (c) { return "&#" + c.charCodeAt(0) + ";"; });
  }
  // Sparse series (a probe logged every k steps, a short run, a deep zoom) show their points too.
  function mode(v) { return v.x.length < 60 ? "lines+markers" : "lines"; }

  function lowerBound(a, v) {
    var lo = 0, hi = a.length;
    while (lo < hi) { var mid = (lo + hi) >> 1; if (a[mid] < v) lo = mid + 1; else hi = mid; }
    return lo;
  }
  // The min and max of each bucket of [lo, hi], in step order; a bucket with no finite value is a gap.
  function view(s, lo, hi) {
    var i0 = lo === null ? 0 : Math.max(0, lowerBound(s.x, lo) - 1);
    var i1 = hi === null ? s.x.length : Math.min(s.x.length, lowerBound(s.x, hi) + 1);
    var n = i1 - i0, xs = [], ys = [], i;
    if (n <= 2 * BUCKETS) {
      for (i = i0; i < i1; i++) { xs.push(s.x[i]); ys.push(isFinite(s.y[i]) ? s.y[i] : null); }
      return {x: xs, y: ys};
    }
    xs.push(s.x[i0]); ys.push(isFinite(s.y[i0]) ? s.y[i0] : null);  // the range's ends are always drawn
    for (var b = 0; b < BUCKETS; b++) {
      var a = i0 + Math.floor(n * b / BUCKETS), e = i0 + Math.floor(n * (b + 1) / BUCKETS);
      var mi = -1, ma = -1;
      for (i = a; i < e; i++) {
        var v = s.y[i];
        if (!isFinite(v)) continue;
        if (mi < 0 || v < s.y[mi]) mi = i;
        if (ma < 0 || v > s.y[ma]) ma = i;
      }
      if (mi < 0) { xs.push(s.x[a]); ys.push(null); continue; }
      var first = Math.min(mi, ma), second = Math.max(mi, ma);
      if (first !== i0) { xs.push(s.x[first]); ys.push(s.y[first]); }
      if (second !== first && second !== i1 - 1) { xs.push(s.x[second]); ys.push(s.y[second]); }
    }
    xs.push(s.x[i1 - 1]); ys.push(isFinite(s.y[i1 - 1]) ? s.y[i1 - 1] : null);
    return {x: xs, y: ys};
  }
  // The last finite value at or before a step: where a mark sits on a line.
  function valueAt(s, step) {
    if (!s) return null;
    for (var i = Math.min(s.x.length - 1, lowerBound(s.x, step + 1) - 1); i >= 0; i--) {
      if (isFinite(s.y[i])) return s.y[i];
    }
    return null;
  }

  function lineTraces(chart) {
    var traces = [];
    data.runs.forEach(function (run, r) {
      chart.keys.forEach(function (key, k) {
        var s = get(r, key);
        if (!s) return;
        var v = view(s, null, null);
        traces.push({type: "scatter", mode: mode(v), x: v.x, y: v.y, name: esc(run.name) + " · " + esc(key),
                     marker: {size: 4}, legendgroup: run.name, connectgaps: false, meta: {run: r, key: key},
                     cliponaxis: false,
                     line: {color: run.color, width: k === 0 ? 1.6 : 1.2, dash: k === 0 ? "solid" : "dot"},
                     hovertemplate: "step %{x}<br>" + esc(key) + " %{y:.4g}<extra>" + esc(run.name) + "</extra>"});
      });
      var named = chart.keys.length > 0, listed = named;  // members only: name each run once in the legend
      chart.layers.forEach(function (key) {
        var s = get(r, key);
        if (!s) return;
        var v = view(s, null, null);
        traces.push({type: "scatter", mode: mode(v), x: v.x, y: v.y, marker: {size: 3}, cliponaxis: false,
                     name: esc(run.name) + " · " + (named ? esc(key) : esc(chart.title) + "/*"),
                     legendgroup: run.name, showlegend: !listed, opacity: 0.45,
                     line: {color: run.color, width: 0.8}, meta: {run: r, key: key},
                     legendrank: 1000,
                     hovertemplate: "step %{x}<br>" + esc(key) + " %{y:.4g}<extra>" + esc(run.name) + "</extra>"});
        listed = true;
      });
    });
    return traces;
  }

  function markTraces(chart) {
    var groups = {}, shapes = [];
    function group(m) {  // one marker trace per run and mark type
      var id = m.run + "\u0000" + m.type;
      return groups[id] = groups[id] || {run: m.run, type: m.type, x: [], y: [], text: []};
    }
    (data.marks[chart.id] || []).forEach(function (m) {
      var run = data.runs[m.run];
      if (m.type === "rollback" || m.type === "abort") {
        if (m.type === "rollback" && m.from !== null && m.from !== undefined) {
          shapes.push({type: "rect", xref: "x", yref: "paper", x0: m.from, x1: m.step, y0: 0, y1: 1,
                       fillcolor: run.color, opacity: 0.10, line: {width: 0}, layer: "below"});
        }
        shapes.push({type: "line", xref: "x", yref: "paper", x0: m.step, x1: m.step, y0: 0, y1: 1,
                     line: {color: m.type === "abort" ? "#c00000" : run.color, width: 1.2, dash: "dash"}});
        var g0 = group(m);
        g0.x.push(m.step); g0.y.push(valueAt(get(m.run, chart.main), m.step)); g0.text.push(m.text);
        return;
      }
      var g = group(m);
      var y = (m.value !== null && m.value !== undefined) ? m.value : valueAt(get(m.run, m.key), m.step);
      g.x.push(m.step); g.y.push(y); g.text.push(m.text);
    });
    var traces = Object.keys(groups).map(function (id) {
      var g = groups[id], run = data.runs[g.run], style = SEVERITY[g.type];
      var marker = style ? {color: style.color, symbol: style.symbol, size: style.size,
                            line: {color: style.color, width: 1.5}}
        : g.type === "skip" ? {color: run.color, symbol: "line-ns-open", size: 14, line: {width: 2}}
        : g.type === "snapshot" ? {color: run.color, symbol: "triangle-down-open", size: 8}
        : {color: run.color, symbol: "diamond-open", size: 10};
      // g.text is built (and escaped) by the page's Python side: it may hold <br>.
      return {type: "scatter", mode: "markers", x: g.x, y: g.y, text: g.text,
              name: esc(run.name) + " · " + esc(g.type),
              legendgroup: run.name, showlegend: false, marker: marker,
              hovertemplate: "%{text}<extra>" + esc(run.name) + "</extra>",
              cliponaxis: false};
    });
    return {traces: traces, shapes: shapes};
  }

  // plotly's toolbar: "Share chart..." (on by default in plotly.js 4) uploads the chart's data to Plotly Cloud, a
  // page that promises to need no network must not offer it; box and lasso select do nothing on this page. What
  // stays (download, zoom, pan, zoom in/out, autoscale, reset) is reachable with Tab and pressed with Enter.
  var CONFIG = {displaylogo: false, responsive: true, showSendToCloud: false,
                modeBarButtonsToRemove: ["select2d", "lasso2d"]};
  // A chart's SVG is a pile of tick labels to a screen reader: its text equivalent is the chart's name
  // (aria-label) and the table of its numbers under it (keel.report.chart_text); the toolbar stays reachable.
  function drawn(div) {
    div.querySelectorAll("svg.main-svg").forEach(function (svg) { svg.setAttribute("aria-hidden", "true"); });
  }

  var divs = [], syncing = false;
  function resample(div, lo, hi) {
    var xs = [], ys = [], modes = [], idx = [];
    div.data.forEach(function (t, i) {
      if (!t.meta || t.meta.key === undefined) return;
      var v = view(get(t.meta.run, t.meta.key), lo, hi);
      xs.push(v.x); ys.push(v.y); modes.push(mode(v)); idx.push(i);
    });
    return idx.length ? Plotly.restyle(div, {x: xs, y: ys, mode: modes}, idx) : Promise.resolve();
  }
  // Resample every chart for [lo, hi] (null: the full range) and give them all that x range.
  function applyRange(lo, hi, source) {
    syncing = true;
    var auto = lo === null;
    var work = divs.map(function (div) {
      return resample(div, lo, hi).then(function () {
        if (div === source && !auto) return null;
        // A reset goes back to the runs' common step range on every chart, marks' padding aside.
        return Plotly.relayout(div, {"xaxis.range": auto ? data.xrange.slice() : [lo, hi]});
      });
    });
    return Promise.all(work).then(function () { syncing = false; },
                                  function (e) { syncing = false; console.error(e); });
  }
  function onRelayout(source, ev) {
    if (syncing) return;
    if (ev["xaxis.range[0]"] !== undefined) applyRange(ev["xaxis.range[0]"], ev["xaxis.range[1]"], source);
    else if (ev["xaxis.range"]) applyRange(ev["xaxis.range"][0], ev["xaxis.range"][1], source);
    else if (ev["xaxis.autorange"] === true) applyRange(null, null, source);
  }
  // A link can open the page zoomed on a stretch of steps: report.html#steps=1200-1400.
  function requestedRange() {
    var m = /steps=(-?\d+(?:\.\d+)?)-(-?\d+(?:\.\d+)?)/.exec(window.location.hash || "");
    return m ? [parseFloat(m[1]), parseFloat(m[2])] : null;
  }
  // What the first line of the first chart shows now (the browser test checks zoom and resampling with it).
  function firstView() {
    var div = divs.filter(function (d) { return d.id === "chart-0"; })[0];
    if (!div || !div.data.length) return null;
    var t = div.data[0], ys = Array.prototype.filter.call(t.y, function (v) { return v !== null; });
    return {points: t.x.length, first: t.x[0], last: t.x[t.x.length - 1], max: Math.max.apply(null, ys)};
  }

  // A series with one value everywhere (an LR without a schedule): plotly's autorange is the value +- 1, which
  // drew lr 3e-4 on the tick labelled 0 of a -0.5 … 1 axis. Such a chart's y range is the value +- half of it
  // instead (a double-click resets to it: it is the layout's own range).
  function constantSpan(chart) {
    var lo = Infinity, hi = -Infinity;
    data.runs.forEach(function (run, r) {
      chart.keys.concat(chart.layers).forEach(function (key) {
        var s = get(r, key);
        if (!s) return;
        for (var i = 0; i < s.y.length; i++) {
          if (isFinite(s.y[i])) { lo = Math.min(lo, s.y[i]); hi = Math.max(hi, s.y[i]); }
        }
      });
    });
    return lo === hi && lo !== 0 ? [lo - Math.abs(lo) / 2, hi + Math.abs(hi) / 2] : null;
  }

  // The legend sits under the plot, in rows; a chart of many runs (50 runs, 40 sweep runs) keeps its plot area
  // by growing with its legend's rows past the first two (it kept 320 px, and 40 names left the plot ~90 px).
  var LEGEND_ROW = 19, CHART_HEIGHT = 320, MAX_GROWTH = 380;
  function chartHeight(traces, width) {
    var names = traces.filter(function (t) { return t.showlegend !== false && t.name; })
                      .map(function (t) { return t.name; });
    if (!names.length) return CHART_HEIGHT;
    var longest = Math.max.apply(null, names.map(function (n) { return n.length; }));
    var perRow = Math.max(1, Math.floor((width - 84) / (44 + 6 * longest)));  // swatch + text at 10 px
    var rows = Math.ceil(names.length / perRow);
    return CHART_HEIGHT + Math.min(MAX_GROWTH, Math.max(0, rows - 2) * LEGEND_ROW);
  }

  var pending = data.charts.map(function (chart) {
    var div = document.getElementById(chart.id);
    var marks = markTraces(chart);
    var lines = lineTraces(chart);
    var span = chart.log_y ? null : constantSpan(chart);
    var layout = {title: {text: esc(chart.title), x: 0.01, font: {size: 14}},
                  height: chartHeight(lines, div.clientWidth || 1200),
                  margin: {l: 64, r: 20, t: 36, b: 64}, hovermode: "closest", shapes: marks.shapes,
                  xaxis: {zeroline: false, range: data.xrange.slice(),
                          title: {text: "step", standoff: 4, font: {size: 11}}},
                  yaxis: {type: chart.log_y ? "log" : "linear", exponentformat: "power", zeroline: false},
                  legend: {orientation: "h", x: 0, y: -0.2, yanchor: "top", font: {size: 10}},
                  paper_bgcolor: "#fff",
                  plot_bgcolor: "#fafafa"};
    if (span) layout.yaxis.range = span;
    return Plotly.newPlot(div, lines.concat(marks.traces), layout, CONFIG).then(function () {
      drawn(div);
      divs.push(div);
      div.setAttribute("data-rendered", "1");
      state.rendered += 1;
      div.on("plotly_relayout", function (ev) { onRelayout(div, ev); });
    });
  });
  // Sweep figures (keel.report.sweep_section): x/y traces drawn as specified, names escaped like the rest.
  var figures = (data.figures || []).map(function (fig) {
    var div = document.getElementById(fig.id);
    var traces = fig.traces.map(function (t) {
      return {type: "scatter", mode: t.mode, x: t.x, y: t.y, name: esc(t.name), showlegend: t.legend,
              connectgaps: false, line: {color: t.color, dash: t.dash, width: 1.6},
              marker: {color: t.color, size: 7}, cliponaxis: false,
              hovertemplate: esc(t.name) + "<br>" + esc(fig.x_title) + " %{x:.3g}<br>" + esc(fig.y_title)
                + " %{y:.4g}<extra></extra>"};
    });
    var axis = function (log, title) {
      return {type: log ? "log" : "linear", exponentformat: "power", zeroline: false,
              title: {text: esc(title), standoff: 4, font: {size: 11}}};
    };
    var layout = {title: {text: esc(fig.title), x: 0.01, font: {size: 14}}, height: 340,
                  margin: {l: 64, r: 20, t: 36, b: 64}, hovermode: "closest",
                  xaxis: axis(fig.log_x, fig.x_title), yaxis: axis(fig.log_y, fig.y_title),
                  legend: {font: {size: 10}}, paper_bgcolor: "#fff", plot_bgcolor: "#fafafa"};
    if (fig.y_range) layout.yaxis.range = fig.y_range;
    return Plotly.newPlot(div, traces, layout, CONFIG).then(function () {
      drawn(div);
      div.setAttribute("data-rendered", "1");
      state.rendered += 1;
    });
  });
  Promise.all(pending.concat(figures)).then(function () {
    var range = requestedRange();
    return range ? applyRange(range[0], range[1], null) : null;
  }).then(function () { state.done = true; publish(); },
          function (e) { state.errors.push("render: " + e); publish(); });
  // Printed (or saved as PDF), a chart kept its screen width (~1230 px) and the page cut it at the paper's edge:
  // the last steps and half the legend were lost. For the print, every chart and figure is drawn at a width that
  // fits A4 and Letter, and the folded tables (decisions, snapshots, metadata, a chart's numbers) are opened;
  // afterwards both are put back.
  var PRINT_WIDTH = 640, opened = [];
  function allCharts() { return Array.prototype.slice.call(document.querySelectorAll(".chart[data-rendered]")); }
  window.addEventListener("beforeprint", function () {
    opened = Array.prototype.slice.call(document.querySelectorAll("details:not([open])"));
    opened.forEach(function (d) { d.open = true; });
    allCharts().forEach(function (div) { Plotly.relayout(div, {width: PRINT_WIDTH}); });
  });
  window.addEventListener("afterprint", function () {
    opened.forEach(function (d) { d.open = false; });
    opened = [];
    allCharts().forEach(function (div) { Plotly.relayout(div, {width: div.clientWidth, autosize: true}); });
  });
  // Where the first screen's content ends (runs, named cause, loss chart): the browser test checks it fits.
  function firstScreen() {
    var top = document.getElementById("overview");
    return top ? {bottom: Math.round(top.getBoundingClientRect().bottom + window.scrollY),
                  height: window.innerHeight} : null;
  }
  // The height of each chart's plot area (px, without title and legend): the browser test checks none collapses.
  function plotHeights() {
    return divs.map(function (div) {
      var bg = div.querySelector(".bglayer rect, .draglayer .nsewdrag");
      return bg ? Math.round(bg.getBoundingClientRect().height) : null;
    });
  }
  function publish() {
    var charts = data.charts.length + (data.figures || []).length;
    document.body.setAttribute("data-keel-charts", String(charts));
    document.body.setAttribute("data-keel-rendered", String(state.rendered));
    document.body.setAttribute("data-keel-errors", String(state.errors.length));
    var out = document.getElementById("keel-status");
    if (out) {
      out.textContent = JSON.stringify({charts: charts, rendered: state.rendered,
                                        errors: state.errors, range: requestedRange(), view: firstView(),
                                        first_screen: firstScreen(), plot_heights: plotHeights(),
                                        drawn_ms: Math.round(performance.now())});
    }
  }
})();
