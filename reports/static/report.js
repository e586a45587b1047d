// lora-sweep report: the X/Y/Z image grid, the image viewer and the heatmaps.
// index.html holds the axes, a zone map per data slice and the heatmap means (<script id="report-data">);
// image rows live in data/grid-*.js and per-image details in data/detail-*.js, each a call to
// loraSweepSlice(kind, number, payload), loaded with <script src> (file:// allows that, not fetch) only
// when the current view needs them. Every text is set with textContent (never innerHTML).
(function () {
  "use strict";

  var data = JSON.parse(document.getElementById("report-data").textContent);
  var axes = data.axes;
  var position = {};
  axes.forEach(function (axis, i) { position[axis.name] = i; });
  var MAX_THUMBS = 400;  // images in the page at once; larger views are paged
  var OFFSET = 2;  // a grid row is [folder index, file name, axis value indexes...]

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  // ---- slices: <script src> files, each calling loraSweepSlice once ----
  var loaded = {};
  var waiting = {};
  window.loraSweepSlice = function (kind, number, payload) {
    var key = kind + ":" + number;
    if (waiting[key]) { waiting[key].resolve(payload); }
  };

  function load(kind, number, file) {
    var key = kind + ":" + number;
    if (!loaded[key]) {
      loaded[key] = new Promise(function (resolve, reject) {
        waiting[key] = { resolve: resolve };
        var script = document.createElement("script");
        script.src = file;
        script.async = true;
        script.onerror = function () {
          delete loaded[key];
          reject(new Error("could not read " + file + " (was the report folder moved or only partly copied?)"));
        };
        script.onload = function () { script.remove(); };
        document.head.appendChild(script);
      });
    }
    return loaded[key];
  }

  function loadGrid(number) { return load("grid", number, data.grid[number].file); }

  function detailOf(image) {
    var global = image.s * data.grid_rows + image.r;
    var number = Math.floor(global / data.detail_rows);
    return load("detail", number, data.details[number]).then(function (rows) {
      return rows[global % data.detail_rows];
    });
  }

  function inZone(ranges, value) {
    for (var i = 0; i < ranges.length; i++) {
      if (value >= ranges[i][0] && value <= ranges[i][1]) { return true; }
    }
    return false;
  }

  // The slices whose zone map admits every fixed filter value.
  function neededSlices(filters) {
    var fixed = axes.map(function (axis, i) { return [i, filters[axis.name]]; })
      .filter(function (f) { return f[1] !== undefined && f[1] !== "*"; });
    var out = [];
    data.grid.forEach(function (slice, s) {
      if (fixed.every(function (f) { return inZone(slice.zones[f[0]], Number(f[1])); })) { out.push(s); }
    });
    return out;
  }

  // For tests and benchmarks: which slice files this page has asked for so far ("grid:3", "detail:12").
  window.loraSweepReport = { read: function () { return Object.keys(loaded); } };

  // ---- the grid ----
  var selects = {
    x: document.getElementById("axis-x"),
    y: document.getElementById("axis-y"),
    z: document.getElementById("axis-z")
  };
  var grids = document.getElementById("grids");
  var status = document.getElementById("grid-status");
  var view = { page: 0, pages: 1, token: 0 };

  function filterValues() {
    var values = {};
    document.querySelectorAll(".filters select[data-axis]").forEach(function (select) {
      values[select.dataset.axis] = select.value;
    });
    return values;
  }

  function matchingImages(slices, roles) {
    var filters = filterValues();
    var tests = axes.map(function (axis, i) { return [i + OFFSET, filters[axis.name]]; })
      .filter(function (t) { return roles.indexOf(axes[t[0] - OFFSET].name) < 0 && t[1] !== "*"; })
      .map(function (t) { return [t[0], Number(t[1])]; });
    var out = [];
    slices.forEach(function (s) {
      var payload = sliceRows[s];
      payload.rows.forEach(function (row, r) {
        for (var k = 0; k < tests.length; k++) {
          if (row[tests[k][0]] !== tests[k][1]) { return; }
        }
        out.push({ s: s, r: r, row: row, src: payload.folders[row[0]] + "/" + row[1] });
      });
    });
    return out;
  }
  var sliceRows = {};

  function distinct(images, axisName) {
    var i = position[axisName] + OFFSET;
    var seen = {};
    images.forEach(function (im) { seen[im.row[i]] = true; });
    return Object.keys(seen).map(Number).sort(function (a, b) { return a - b; });
  }

  function valueOf(im, axisName) { return im.row[position[axisName] + OFFSET]; }

  function labelCell(tag, className, axisName, valueIndex) {
    var axis = axes[position[axisName]];
    var cell = el(tag, className, axis.values[valueIndex]);
    cell.title = axis.label + " = " + axis.titles[valueIndex];
    return cell;
  }

  // [name, value] pairs for the viewer: every axis value, the sweep's constants, then the image's details.
  function params(im, extra) {
    var pairs = axes.map(function (axis) { return [axis.name, axis.titles[valueOf(im, axis.name)]]; });
    return pairs.concat(data.constants.map(function (c) { return [c[0], c[2]]; })).concat(extra || []);
  }

  function thumbnail(im) {
    var link = el("a", "thumb");
    link.href = im.src;
    var img = el("img");
    img.src = im.src;
    img.alt = params(im).slice(1, 8).map(function (p) { return p[0] + " " + p[1]; }).join(", ");
    link.appendChild(img);
    link.addEventListener("click", function (event) {
      event.preventDefault();
      openViewer(im);
    });
    return link;
  }

  function buildHead(xName, yName, xs) {
    var head = el("thead");
    var row = el("tr");
    var corner = el("th", "corner");
    corner.appendChild(el("span", "corner-y", axes[position[yName]].label + " ↓"));
    corner.appendChild(el("span", "corner-x", axes[position[xName]].label + " →"));
    row.appendChild(corner);
    xs.forEach(function (x) { row.appendChild(labelCell("th", "col", xName, x)); });
    head.appendChild(row);
    return head;
  }

  // One Z group's rows [y, cells by x] of this page, each cell showing its images [first, first + perCell).
  function buildTable(group, rows, first, perCell) {
    var table = el("table", "xy");
    table.appendChild(buildHead(group.x, group.y, group.xs));
    var body = el("tbody");
    rows.forEach(function (y) {
      var row = el("tr");
      row.appendChild(labelCell("th", "row", group.y, y));
      group.xs.forEach(function (x) {
        var td = el("td");
        var cell = group.cells[y + "|" + x] || [];
        cell.slice(first, first + perCell).forEach(function (im) { td.appendChild(thumbnail(im)); });
        if (!td.firstChild) { td.appendChild(el("span", "muted", "—")); }
        if (cell.length > perCell) {
          td.appendChild(el("div", "muted more", Math.min(first + 1, cell.length) + "–" +
            Math.min(first + perCell, cell.length) + " of " + cell.length));
        }
        row.appendChild(td);
      });
      body.appendChild(row);
    });
    table.appendChild(body);
    return table;
  }

  function groupBy(images, x, y, z) {
    var zs = z ? distinct(images, z) : [null];
    return zs.map(function (zValue) {
      var subset = zValue === null ? images : images.filter(function (im) { return valueOf(im, z) === zValue; });
      var cells = {};
      var largest = 0;
      subset.forEach(function (im) {
        var key = valueOf(im, y) + "|" + valueOf(im, x);
        (cells[key] = cells[key] || []).push(im);
        largest = Math.max(largest, cells[key].length);
      });
      return { z: zValue, x: x, y: y, xs: distinct(subset, x), ys: distinct(subset, y), cells: cells,
               largest: largest };
    });
  }

  // Pages: each page shows some (Z, Y) rows with at most perCell images per cell; a cell holding more
  // images pages through them after the last row page.
  function layoutPages(groups, perCell) {
    var width = Math.max.apply(null, groups.map(function (g) { return g.xs.length; }).concat([1]));
    var rowsPerPage = Math.max(1, Math.floor(MAX_THUMBS / (width * perCell)));
    var rows = [];
    groups.forEach(function (g, gi) { g.ys.forEach(function (y) { rows.push([gi, y]); }); });
    var largest = Math.max.apply(null, groups.map(function (g) { return g.largest; }).concat([1]));
    return { rows: rows, rowsPerPage: rowsPerPage, rowPages: Math.max(1, Math.ceil(rows.length / rowsPerPage)),
             cellPages: Math.max(1, Math.ceil(largest / perCell)) };
  }

  function drawPage(groups, plan, perCell) {
    var rowPage = view.page % plan.rowPages;
    var cellPage = Math.floor(view.page / plan.rowPages);
    var shown = plan.rows.slice(rowPage * plan.rowsPerPage, (rowPage + 1) * plan.rowsPerPage);
    var parts = [];
    groups.forEach(function (g, gi) {
      var ys = shown.filter(function (r) { return r[0] === gi; }).map(function (r) { return r[1]; });
      if (!ys.length) { return; }
      if (g.z !== null) {
        var zAxis = axes[position[selects.z.value]];
        parts.push(el("h3", "z-title", zAxis.label + " = " + zAxis.titles[g.z]));
      }
      var wrap = el("div", "grid-wrap");
      wrap.appendChild(buildTable(g, ys, cellPage * perCell, perCell));
      parts.push(wrap);
    });
    grids.replaceChildren.apply(grids, parts);
    var pager = document.getElementById("pager");
    pager.hidden = view.pages < 2;
    document.getElementById("page-status").textContent = "page " + (view.page + 1) + " of " + view.pages +
      " · rows " + (rowPage * plan.rowsPerPage + 1) + "–" + (rowPage * plan.rowsPerPage + shown.length) +
      " of " + plan.rows.length + (plan.cellPages > 1 ? " · images " + (cellPage * perCell + 1) + "–" +
      ((cellPage + 1) * perCell) + " of each cell" : "");
    document.getElementById("page-prev").disabled = view.page === 0;
    document.getElementById("page-next").disabled = view.page >= view.pages - 1;
  }

  var current = null;  // the last grouped view, for paging without regrouping

  function show(images) {
    var x = selects.x.value, y = selects.y.value, z = selects.z.value;
    var perCell = Number(document.getElementById("per-cell").value);
    if (!images.length) {
      grids.replaceChildren(el("p", "muted", "No image matches the current filters."));
      document.getElementById("pager").hidden = true;
      current = null;
      return;
    }
    var groups = groupBy(images, x, y, z);
    var plan = layoutPages(groups, perCell);
    view.pages = plan.rowPages * plan.cellPages;
    view.page = Math.min(view.page, view.pages - 1);
    current = { groups: groups, plan: plan, perCell: perCell };
    drawPage(groups, plan, perCell);
  }

  function render(keepPage) {
    var x = selects.x.value, y = selects.y.value, z = selects.z.value;
    var roles = [x, y, z];
    if (!keepPage) { view.page = 0; }
    document.querySelectorAll(".filters .filter").forEach(function (label) {
      label.hidden = roles.indexOf(label.dataset.axis) >= 0;
    });
    var filters = filterValues();
    roles.forEach(function (role) { if (role) { filters[role] = "*"; } });
    var needed = neededSlices(filters);
    var token = ++view.token;
    var done = 0;
    grids.dataset.state = "loading";
    status.textContent = needed.length ? "reading " + needed.length + " data file(s)…" : "";
    Promise.all(needed.map(function (s) {
      return loadGrid(s).then(function (payload) {
        sliceRows[s] = payload;
        done += 1;
        if (token === view.token) { status.textContent = "reading data files: " + done + " of " + needed.length; }
      });
    })).then(function () {
      if (token !== view.token) { return; }
      var images = matchingImages(needed, roles);
      show(images);
      status.textContent = images.length + " image(s) match · " + needed.length + " of " + data.grid.length +
        " data file(s) read";
      grids.dataset.state = "ready";
    }).catch(function (error) {
      if (token !== view.token) { return; }
      grids.replaceChildren(el("p", "alert", String(error.message || error)));
      grids.dataset.state = "error";
    });
  }

  // Two roles may not share an axis: the role that had it takes the changed role's old axis.
  var previous = {};
  function resolveClash(changed) {
    ["x", "y", "z"].forEach(function (role) {
      if (role !== changed && selects[role].value !== "" && selects[role].value === selects[changed].value) {
        selects[role].value = previous[changed];
      }
    });
    Object.keys(selects).forEach(function (role) { previous[role] = selects[role].value; });
  }

  // ---- the viewer ----
  function fillTable(table, rows) {
    table.replaceChildren();
    rows.forEach(function (cells) {
      var tr = el("tr");
      tr.appendChild(el("th", "", cells[0]));
      cells.slice(1).forEach(function (cell) {
        var td = el("td");
        if (cell instanceof Node) { td.appendChild(cell); } else { td.textContent = cell; }
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
  }

  function referenceNode(ref) {
    if (!ref) { return ""; }
    var box = el("div", "reference");
    if (ref.src) {
      var img = el("img");
      img.src = ref.src;
      img.alt = ref.label;
      box.appendChild(img);
    }
    box.appendChild(el("div", "muted", "reference: " + ref.label));
    return box;
  }

  function viewerTitle(pairs) {
    var p = {};
    pairs.forEach(function (pair) { p[pair[0]] = pair[1]; });
    var parts = [p.base_model, "rank " + p.rank, "step " + p.checkpoint_step, p.sampler, "weight " + p.lora_weight,
      "seed " + p.seed].concat(p.extra_loras ? [p.extra_loras] : []);
    return { text: parts.join(" · "), prompt: p.prompt };
  }

  function openViewer(im) {
    var dialog = document.getElementById("viewer");
    dialog.dataset.state = "loading";
    var title = viewerTitle(params(im));
    document.getElementById("viewer-title").textContent = title.text;
    var img = el("img");
    img.id = "viewer-img";
    img.src = im.src;
    img.alt = title.prompt;
    var link = document.getElementById("viewer-link");
    link.href = im.src;
    link.replaceChildren(img);
    fillTable(document.getElementById("viewer-params"), params(im));
    fillTable(document.getElementById("viewer-metrics"), [["…", "reading this image's metrics"]]);
    if (!dialog.open) { dialog.showModal(); }
    detailOf(im).then(function (detail) {
      var pairs = params(im, detail[0]);
      document.getElementById("viewer-title").textContent = viewerTitle(pairs).text;
      fillTable(document.getElementById("viewer-params"), pairs);
      var metrics = detail[1].map(function (m) {
        var value = el("span", "metric-value", m.value);
        value.appendChild(el("span", "muted metric-direction", m.better));
        return [m.name, value, referenceNode(m.ref)];
      });
      fillTable(document.getElementById("viewer-metrics"), metrics.length ? metrics : [["—", "no metrics recorded"]]);
      dialog.dataset.state = "ready";
    }).catch(function (error) {
      fillTable(document.getElementById("viewer-metrics"), [["error", String(error.message || error)]]);
      dialog.dataset.state = "error";
    });
  }

  function setupViewer() {
    var dialog = document.getElementById("viewer");
    document.getElementById("viewer-close").addEventListener("click", function () { dialog.close(); });
    dialog.addEventListener("click", function (event) {
      if (event.target === dialog) { dialog.close(); }
    });
  }

  function setupControls() {
    ["x", "y", "z"].forEach(function (role) {
      previous[role] = selects[role].value;
      selects[role].addEventListener("change", function () { resolveClash(role); render(false); });
    });
    document.querySelectorAll(".filters select").forEach(function (select) {
      select.addEventListener("change", function () { render(false); });
    });
    document.getElementById("per-cell").addEventListener("change", function () { render(false); });
    var turn = function (step) {
      view.page = Math.max(0, Math.min(view.pages - 1, view.page + step));
      if (current) { drawPage(current.groups, current.plan, current.perCell); }
    };
    document.getElementById("page-prev").addEventListener("click", function () { turn(-1); });
    document.getElementById("page-next").addEventListener("click", function () { turn(1); });
    var size = document.getElementById("thumb-size");
    var shown = document.getElementById("thumb-size-value");
    var apply = function () {
      grids.style.setProperty("--thumb", size.value + "px");
      shown.textContent = size.value + " px";
    };
    size.addEventListener("input", apply);
    apply();
    document.getElementById("grid-controls").addEventListener("submit", function (e) { e.preventDefault(); });
  }

  if (selects.x && grids) {
    setupViewer();
    setupControls();
    render(false);
  }
  setupHeatmaps();

  // ---- heatmaps: means per (row value, column value) from data.heat, coloured worst to best ----
  // Light (worse) to dark (better): a sequential blue ramp that stays readable in print.
  function heatColor(t) {
    var stops = [[233, 242, 251], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
    t = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
    var i = Math.min(Math.floor(t), stops.length - 2), f = t - i;
    var rgb = stops[i].map(function (a, k) { return Math.round(a + (stops[i + 1][k] - a) * f); });
    var luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2];
    return ["rgb(" + rgb.join(", ") + ")", luminance < 140 ? "#ffffff" : "#111111"];
  }

  function fmt(v) { return Number(v.toPrecision(4)).toString(); }

  function heatTable(metric, higher, rowAxis, colAxis, cells, flip) {
    var rows = {}, cols = {}, means = {};
    cells.forEach(function (c) {
      var r = flip ? c[2] : c[1], k = flip ? c[1] : c[2];
      rows[r] = true; cols[k] = true; means[r + "|" + k] = c;
    });
    var rs = Object.keys(rows).map(Number).sort(function (a, b) { return a - b; });
    var ks = Object.keys(cols).map(Number).sort(function (a, b) { return a - b; });
    var values = cells.map(function (c) { return c[3]; });
    var low = Math.min.apply(null, values), high = Math.max.apply(null, values);
    var best = higher ? high : low;
    var table = el("table");
    var head = el("tr");
    head.appendChild(el("th", "corner", rowAxis.label + " \\ " + colAxis.label));
    ks.forEach(function (k) { head.appendChild(el("th", "", colAxis.values[k])); });
    table.appendChild(el("thead")).appendChild(head);
    var body = table.appendChild(el("tbody"));
    rs.forEach(function (r) {
      var tr = body.appendChild(el("tr"));
      tr.appendChild(el("th", "", rowAxis.values[r]));
      ks.forEach(function (k) {
        var c = means[r + "|" + k];
        if (!c) { tr.appendChild(el("td", "empty", "—")); return; }
        var t = high === low ? 0.5 : (c[3] - low) / (high - low);
        var colors = heatColor(higher ? t : 1 - t);
        var td = el("td", c[3] === best ? "best" : "", fmt(c[3]));
        td.style.background = colors[0];
        td.style.color = colors[1];
        td.title = metric + " " + rowAxis.label + " " + rowAxis.titles[r] + ", " + colAxis.label + " " +
          colAxis.titles[k] + ": mean " + c[3] + " over " + c[4] + " images";
        tr.appendChild(td);
      });
    });
    return [table, fmt(low), fmt(high)];
  }

  function drawHeatmaps() {
    var out = document.getElementById("heatmaps-out");
    var rowName = document.getElementById("heat-rows").value, colName = document.getElementById("heat-cols").value;
    var heat = data.heat;
    if (rowName === colName) {
      out.replaceChildren(el("p", "muted", "Choose two different axes for rows and columns."));
      return;
    }
    var flip = position[rowName] > position[colName];
    var key = flip ? colName + "|" + rowName : rowName + "|" + colName;
    var cells = heat.cells[key];
    if (!cells) {
      out.replaceChildren(el("p", "muted", "These two axes have more than " + heat.max_cells +
        " combinations: too many for a heatmap. The axis effects below summarise each on its own."));
      return;
    }
    var split = heat.split && heat.split !== rowName && heat.split !== colName ? axes[position[heat.split]] : null;
    var parts = [];
    heat.metrics.forEach(function (m, mi) {
      var mine = cells.filter(function (c) { return c[0] === mi; });
      var splits = {};
      mine.forEach(function (c) { (splits[c[5]] = splits[c[5]] || []).push(c); });
      Object.keys(splits).map(Number).sort(function (a, b) { return a - b; }).forEach(function (sv) {
        var drawn = heatTable(m[0], m[1], axes[position[rowName]], axes[position[colName]], splits[sv], flip);
        var figure = el("figure", "heatmap");
        figure.dataset.metric = m[0];
        var caption = figure.appendChild(el("figcaption"));
        caption.appendChild(el("b", "", m[0]));
        if (split && sv >= 0) { caption.appendChild(document.createTextNode(" · " + split.titles[sv])); }
        caption.appendChild(el("span", "muted", " (" + (m[1] ? "higher" : "lower") + " is better; range " +
          drawn[1] + " – " + drawn[2] + ")"));
        figure.appendChild(drawn[0]);
        parts.push(figure);
      });
    });
    if (!parts.length) { parts.push(el("p", "muted", "No metrics recorded for LoRA images yet.")); }
    out.replaceChildren.apply(out, parts);
  }

  function setupHeatmaps() {
    var rows = document.getElementById("heat-rows"), cols = document.getElementById("heat-cols");
    if (!rows || !cols) { return; }
    var names = axes.map(function (a) { return a.name; });
    var pick = function (wanted, fallback) { return names.indexOf(wanted) >= 0 ? wanted : fallback; };
    rows.value = pick("rank", data.defaults.y);
    cols.value = pick("checkpoint_step", data.defaults.x);
    if (rows.value === cols.value) { cols.value = rows.value === data.defaults.x ? data.defaults.y : data.defaults.x; }
    rows.addEventListener("change", drawHeatmaps);
    cols.addEventListener("change", drawHeatmaps);
    drawHeatmaps();
  }
})();
