// report.html's script (medfm.report.html inlines it): filters, sortable tables, Plotly plots.
// Reads the page's data (<script id="medfm-data">): one row per condition and variant.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("medfm-data").textContent);
  const COL = {};
  DATA.columns.forEach((name, i) => { COL[name] = i; });
  const VARIANTS = DATA.variants;
  const PCT = DATA.percent;
  const LABELS = { acc: "ACC", auc: "AUC", balanced_acc: "bal. ACC", ece: "ECE", be: "BE" };
  const FIELDS = ["dataset", "size", "paradigm", "regime", "backbone"];
  const selected = {};

  function esc(text) {
    return String(text).replace(/[&<>"']/g, (c) => (
      { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }
  function variantHtml(index) {
    const v = VARIANTS[index];
    return `<span class="variant" title="${esc(v.variant + "\n" + v.settings)}">${esc(v.label)}</span>`;
  }
  function pct(mean, std) {
    if (mean === null) return "—";
    const m = (mean * PCT).toFixed(1);
    return std === null ? m : `${m} ± ${(std * PCT).toFixed(1)}`;
  }
  function field(row, name) {
    if (name === "paradigm" || name === "backbone") return VARIANTS[row[COL.variant]][name];
    return String(row[COL[name]]);
  }

  // -- filters ------------------------------------------------------------------------------
  function readFilters() {
    for (const box of document.querySelectorAll("fieldset.filter")) {
      const checked = box.querySelectorAll("input:checked");
      selected[box.dataset.field] = new Set(Array.from(checked, (input) => input.value));
    }
  }
  function passes(row) {
    return FIELDS.every((name) => selected[name].has(field(row, name)));
  }
  function variantShown(index) {
    const v = VARIANTS[index];
    return selected.paradigm.has(v.paradigm) && selected.backbone.has(v.backbone);
  }

  // -- a sortable, paged table over an array of records --------------------------------------
  // columns: [{title, value(record) -> number|string|null, html(record), text: bool,
  //            hover(record) -> ' title="..."' or ""}]
  function DataTable(table, pager, columns, sortBy) {
    this.table = table; this.pager = pager; this.columns = columns;
    this.sort = sortBy; this.desc = false; this.page = 0; this.records = [];
    table.addEventListener("click", (event) => {
      const th = event.target.closest("th");
      if (!th) return;
      const i = Number(th.dataset.col);
      this.desc = this.sort === i ? !this.desc : !columns[i].text;
      this.sort = i; this.page = 0; this.render();
    });
    pager.addEventListener("click", (event) => {
      const step = event.target.dataset && event.target.dataset.step;
      if (!step) return;
      this.page += Number(step); this.render();
    });
  }
  DataTable.prototype.show = function (records) {
    this.records = records; this.page = 0; this.render();
  };
  DataTable.prototype.render = function () {
    const column = this.columns[this.sort];
    const sign = this.desc ? -1 : 1;
    const sorted = this.records.slice().sort((a, b) => {
      const x = column.value(a), y = column.value(b);
      if (x === null || y === null) return (x === null) - (y === null);  // missing last
      return (x < y ? -1 : x > y ? 1 : 0) * sign;
    });
    const per = DATA.page_rows;
    const pages = Math.max(1, Math.ceil(sorted.length / per));
    this.page = Math.min(Math.max(this.page, 0), pages - 1);
    const shown = sorted.slice(this.page * per, (this.page + 1) * per);
    const head = this.columns.map((c, i) => {
      const sort = i === this.sort ? ` aria-sort="${this.desc ? "descending" : "ascending"}"` : "";
      return `<th data-col="${i}"${sort}${c.text ? ' class="text"' : ""}>${esc(c.title)}</th>`;
    }).join("");
    const body = shown.map((r) => "<tr>" + this.columns.map(
      (c) => `<td${c.text ? ' class="text"' : ""}${c.hover ? c.hover(r) : ""}>${c.html(r)}</td>`)
      .join("") + "</tr>").join("");
    this.table.innerHTML = `<thead><tr>${head}</tr></thead><tbody>${body}</tbody>`;
    if (!sorted.length) {
      this.pager.textContent = "Nothing matches the filters.";
      return;
    }
    const first = this.page * per + 1, last = this.page * per + shown.length;
    this.pager.innerHTML = `rows ${first}–${last} of ${sorted.length}` + (pages > 1
      ? ` <button type="button" data-step="-1"${this.page ? "" : " disabled"}>previous</button>`
        + `<button type="button" data-step="1"${this.page < pages - 1 ? "" : " disabled"}>next</button>`
      : "");
  };

  function metricColumn(metric, get, interval) {
    return { title: `${LABELS[metric]} (%)`, value: (r) => get(r, metric)[0],
             html: (r) => pct(...get(r, metric)), hover: interval && ((r) => interval(r, metric)) };
  }
  function ciTitle(r, metric) {  // the seed mean of the bootstrap 95% CI bounds, where stored
    const low = r[COL[`${metric}_ci_low`]], high = r[COL[`${metric}_ci_high`]];
    if (low === undefined || low === null || high === null) return "";
    return ` title="95% CI, seed mean of bootstrap bounds: ${(low * PCT).toFixed(1)}–`
      + `${(high * PCT).toFixed(1)}"`;
  }
  const fromRow = (r, m) => [r[COL[`${m}_mean`]], r[COL[`${m}_std`]]];
  const results = new DataTable(
    document.getElementById("results-table"), document.getElementById("results-pager"), [
      { title: "dataset", text: true, value: (r) => r[COL.dataset], html: (r) => esc(r[COL.dataset]) },
      { title: "size", value: (r) => r[COL.size], html: (r) => r[COL.size] },
      { title: "training data", value: (r) => r[COL.order], html: (r) => esc(r[COL.regime]) },
      { title: "variant", text: true, value: (r) => VARIANTS[r[COL.variant]].label,
        html: (r) => variantHtml(r[COL.variant]) },
      { title: "paradigm", text: true, value: (r) => field(r, "paradigm"),
        html: (r) => esc(field(r, "paradigm")) },
      { title: "seeds", value: (r) => r[COL.n_seeds], html: (r) => r[COL.n_seeds] },
      ...DATA.metrics.map((m) => metricColumn(m, fromRow, ciTitle)),
    ], 0);

  // the mean over the selected datasets (tables.mean_over_datasets on the filtered rows)
  function means(rows) {
    const cells = new Map();
    for (const r of rows) {
      const key = `${r[COL.size]}|${r[COL.regime]}`;
      if (!cells.has(key)) cells.set(key, { datasets: new Set(), variants: new Map() });
      const cell = cells.get(key);
      cell.datasets.add(r[COL.dataset]);
      if (!cell.variants.has(r[COL.variant])) cell.variants.set(r[COL.variant], []);
      cell.variants.get(r[COL.variant]).push(r);
    }
    const out = [];
    for (const cell of cells.values()) {
      for (const [variant, runs] of cell.variants) {
        if (new Set(runs.map((r) => r[COL.dataset])).size !== cell.datasets.size) continue;
        const mean = (m) => {
          const values = runs.map((r) => r[COL[`${m}_mean`]]);
          return values.includes(null) ? null : values.reduce((a, b) => a + b, 0) / values.length;
        };
        out.push({ size: runs[0][COL.size], regime: runs[0][COL.regime], order: runs[0][COL.order],
                   variant, n: cell.datasets.size, acc: mean("acc"), auc: mean("auc") });
      }
    }
    return out;
  }
  const meanTable = new DataTable(
    document.getElementById("means-table"), document.getElementById("means-pager"), [
      { title: "size", value: (r) => r.size, html: (r) => r.size },
      { title: "training data", value: (r) => r.order, html: (r) => esc(r.regime) },
      { title: "datasets", value: (r) => r.n, html: (r) => r.n },
      { title: "variant", text: true, value: (r) => VARIANTS[r.variant].label,
        html: (r) => variantHtml(r.variant) },
      ...["acc", "auc"].map((m) => metricColumn(m, (r, k) => [r[k], null])),
    ], 0);

  // -- the report's static tables: filter rows and variant columns, sort on a header click ---
  function number(text) {
    const value = parseFloat(text.replace(/[^0-9eE+.-].*$/, ""));
    return Number.isNaN(value) ? null : value;
  }
  function filterStatic(table) {
    const heads = Array.from(table.tHead.rows[0].cells);
    const hidden = heads.map((th) => th.dataset.variant !== undefined
                                   && !variantShown(Number(th.dataset.variant)));
    heads.forEach((th, i) => { th.hidden = hidden[i]; });
    for (const tr of table.tBodies[0].rows) {
      tr.hidden = ["dataset", "size", "regime"].some(
        (name) => tr.dataset[name] !== undefined && !selected[name].has(tr.dataset[name]));
      Array.from(tr.cells).forEach((td, i) => { td.hidden = hidden[i]; });
    }
  }
  function sortStatic(table, th) {
    const i = th.cellIndex;
    const desc = th.getAttribute("aria-sort") === "ascending";
    for (const other of table.tHead.rows[0].cells) other.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", desc ? "descending" : "ascending");
    const rows = Array.from(table.tBodies[0].rows);
    const keys = rows.map((tr) => tr.cells[i].textContent.trim());
    const numeric = keys.every((k) => k === "—" || number(k) !== null);
    const order = rows.map((tr, j) => j).sort((a, b) => {
      const x = numeric ? number(keys[a]) : keys[a], y = numeric ? number(keys[b]) : keys[b];
      if (x === null || y === null) return (x === null) - (y === null);
      return (x < y ? -1 : x > y ? 1 : 0) * (desc ? -1 : 1);
    });
    table.tBodies[0].append(...order.map((j) => rows[j]));
  }
  const statics = Array.from(document.querySelectorAll("table.static"));
  for (const table of statics) {
    table.tHead.addEventListener("click", (event) => {
      const th = event.target.closest("th");
      if (th) sortStatic(table, th);
    });
  }

  // -- plots ---------------------------------------------------------------------------------
  const metricSelect = document.getElementById("plot-metric");
  const cellSelect = document.getElementById("plot-cell");
  const datasetSelect = document.getElementById("plot-dataset");
  function setOptions(select, values) {
    const keep = select.value;
    select.innerHTML = values.map((v) => `<option>${esc(v)}</option>`).join("");
    if (values.includes(keep)) select.value = keep;
  }
  function empty(div, text) {
    if (window.Plotly) Plotly.purge(div);
    div.innerHTML = `<p class="empty">${esc(text)}</p>`;
  }
  function draw(div, traces, layout) {
    if (!traces.length) { empty(div, "Nothing to plot for the selected filters."); return; }
    if (div.querySelector(".empty")) div.innerHTML = "";
    Plotly.react(div, traces, {
      height: 460, margin: { t: 40, r: 10, b: 10, l: 60 }, hovermode: "closest",
      legend: { orientation: "h", y: -0.2, yanchor: "top", font: { size: 11 } }, ...layout,
    }, DATA.plotly_config);
  }
  function trace(index, runs, x, metric) {
    const v = VARIANTS[index];
    return {
      type: "scatter", mode: "lines+markers", name: v.label, x: runs.map(x),
      y: runs.map((r) => r[COL[`${metric}_mean`]] * PCT),
      error_y: { type: "data", visible: true,
                 array: runs.map((r) => (r[COL[`${metric}_std`]] || 0) * PCT) },
      customdata: runs.map((r) => [r[COL.regime], r[COL.n_seeds], r[COL.size]]),
      hovertemplate: `${esc(v.variant)}<br>%{customdata[0]} @ %{customdata[2]} px, `
        + `%{customdata[1]} seed(s)<br>${LABELS[metric]} %{y:.1f}% ± %{error_y.array:.1f}<extra></extra>`,
    };
  }
  function byVariant(rows) {
    const groups = new Map();
    for (const r of rows) {
      if (!groups.has(r[COL.variant])) groups.set(r[COL.variant], []);
      groups.get(r[COL.variant]).push(r);
    }
    return Array.from(groups).sort((a, b) => a[0] - b[0]);
  }
  function plot(rows) {
    const metric = metricSelect.value;
    const scored = rows.filter((r) => r[COL.fraction] !== null && r[COL[`${metric}_mean`]] !== null);
    const cells = Array.from(new Set(scored.map((r) => `${r[COL.dataset]} @ ${r[COL.size]} px`)));
    setOptions(cellSelect, cells.sort());
    const inCell = scored.filter((r) => `${r[COL.dataset]} @ ${r[COL.size]} px` === cellSelect.value);
    const fractions = Array.from(new Set(inCell.map((r) => +(r[COL.fraction] * PCT).toPrecision(6))))
      .sort((a, b) => a - b);
    draw(document.getElementById("plot-fraction"),
         byVariant(inCell).map(([index, runs]) => trace(
           index, runs.sort((a, b) => a[COL.fraction] - b[COL.fraction]),
           (r) => r[COL.fraction] * PCT, metric)),
         { title: { text: `${cellSelect.value}: test ${LABELS[metric]} vs training data` },
           xaxis: { type: "log", title: { text: "training fraction (%)" }, tickvals: fractions,
                    ticktext: fractions.map((f) => `${f}%`) },
           yaxis: { title: { text: `test ${LABELS[metric]} (%)` } } });
    const sizes = new Map();
    for (const r of scored) {
      if (!sizes.has(r[COL.dataset])) sizes.set(r[COL.dataset], new Set());
      sizes.get(r[COL.dataset]).add(r[COL.size]);
    }
    setOptions(datasetSelect, Array.from(sizes).filter(([, s]) => s.size > 1).map(([d]) => d).sort());
    const ofDataset = scored.filter((r) => r[COL.dataset] === datasetSelect.value);
    const traces = byVariant(ofDataset).map(([index, runs]) => {
      const top = new Map();  // size -> the run at the largest fraction
      for (const r of runs) {
        const best = top.get(r[COL.size]);
        if (!best || r[COL.fraction] > best[COL.fraction]) top.set(r[COL.size], r);
      }
      const points = Array.from(top.values()).sort((a, b) => a[COL.size] - b[COL.size]);
      return trace(index, points, (r) => r[COL.size], metric);
    });
    const ticks = Array.from(sizes.get(datasetSelect.value) || []).sort((a, b) => a - b);
    draw(document.getElementById("plot-size"), traces,
         { title: { text: `${datasetSelect.value || "no dataset at two sizes"}: test `
                          + `${LABELS[metric]} vs image size (largest fraction run)` },
           xaxis: { type: "log", tickvals: ticks, ticktext: ticks.map(String),
                    title: { text: "image size (px)" } },
           yaxis: { title: { text: `test ${LABELS[metric]} (%)` } } });
  }

  // -- the filters in the address (#dataset=breastmnist&size=28): a view to bookmark or send ---
  function saveFilters() {
    const params = new URLSearchParams();
    for (const box of document.querySelectorAll("fieldset.filter")) {
      const inputs = Array.from(box.querySelectorAll("input"));
      const on = inputs.filter((input) => input.checked).map((input) => input.value);
      if (on.length === inputs.length) continue;  // everything: not named
      if (!on.length) params.append(box.dataset.field, "");  // nothing
      on.forEach((value) => params.append(box.dataset.field, value));
    }
    const hash = params.toString();
    if (hash !== location.hash.slice(1)) history.replaceState(null, "", hash ? `#${hash}` : " ");
  }
  function loadFilters() {
    const params = new URLSearchParams(location.hash.slice(1));
    for (const box of document.querySelectorAll("fieldset.filter")) {
      if (!params.has(box.dataset.field)) continue;
      const wanted = new Set(params.getAll(box.dataset.field));
      box.querySelectorAll("input").forEach((input) => { input.checked = wanted.has(input.value); });
    }
  }

  // -- wiring ----------------------------------------------------------------------------------
  let pending = false;
  function update() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      readFilters();
      saveFilters();
      const rows = DATA.rows.filter(passes);
      document.getElementById("count").textContent =
        `${rows.length} of ${DATA.rows.length} rows (condition × variant) shown`;
      results.show(rows);
      meanTable.show(means(rows));
      statics.forEach(filterStatic);
      plot(rows);
    });
  }
  const filters = document.getElementById("filters");
  filters.addEventListener("change", update);
  filters.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    const box = button.closest("fieldset");
    const boxes = box ? [box] : Array.from(filters.querySelectorAll("fieldset"));
    const on = !button.classList.contains("none");
    for (const b of boxes) b.querySelectorAll("input").forEach((input) => { input.checked = on; });
    update();
  });
  for (const select of [metricSelect, cellSelect, datasetSelect]) {
    select.addEventListener("change", () => plot(DATA.rows.filter(passes)));
  }
  window.addEventListener("hashchange", () => { loadFilters(); update(); });
  loadFilters();
  update();
})();
