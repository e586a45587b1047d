// lora-sweep report: the X/Y/Z image grid and the image viewer.
// Data comes from <script type="application/json" id="report-data">; every text is set with
// textContent (never innerHTML), so prompts and errors always show as text.
(function () {
  "use strict";

  var data = JSON.parse(document.getElementById("report-data").textContent);
  var axes = data.axes;
  var position = {};
  axes.forEach(function (axis, i) { position[axis.name] = i; });

  var selects = {
    x: document.getElementById("axis-x"),
    y: document.getElementById("axis-y"),
    z: document.getElementById("axis-z")
  };
  var grids = document.getElementById("grids");
  if (!selects.x || !grids) { return; }
  var previous = { x: selects.x.value, y: selects.y.value, z: selects.z.value };

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function filterValues() {
    var values = {};
    document.querySelectorAll(".filters select[data-axis]").forEach(function (select) {
      values[select.dataset.axis] = select.value;
    });
    return values;
  }

  // Two roles may not share an axis: the role that had it takes the changed role's old axis.
  function resolveClash(changed) {
    ["x", "y", "z"].forEach(function (role) {
      if (role !== changed && selects[role].value !== "" && selects[role].value === selects[changed].value) {
        selects[role].value = previous[changed];
      }
    });
    Object.keys(selects).forEach(function (role) { previous[role] = selects[role].value; });
  }

  function matchingImages(roles) {
    var filters = filterValues();
    return data.images.filter(function (image) {
      return axes.every(function (axis, i) {
        if (roles.indexOf(axis.name) >= 0 || filters[axis.name] === "*") { return true; }
        return String(image.ax[i]) === filters[axis.name];
      });
    });
  }

  function distinct(images, axisName) {
    var i = position[axisName];
    var seen = {};
    images.forEach(function (image) { seen[image.ax[i]] = true; });
    return Object.keys(seen).map(Number).sort(function (a, b) { return a - b; });
  }

  function labelCell(tag, className, axisName, valueIndex) {
    var axis = axes[position[axisName]];
    var cell = el(tag, className, axis.values[valueIndex]);
    cell.title = axis.label + " = " + axis.titles[valueIndex];
    return cell;
  }

  // [name, value] pairs for the viewer: every axis value, then the image's other parameters.
  function params(image) {
    return axes.map(function (axis, i) { return [axis.name, axis.titles[image.ax[i]]]; }).concat(image.extra);
  }

  function thumbnail(image) {
    var link = el("a", "thumb");
    link.href = image.src;
    var img = el("img");
    img.src = image.src;
    img.alt = params(image).slice(1, 8).map(function (p) { return p[0] + " " + p[1]; }).join(", ");
    link.appendChild(img);
    link.addEventListener("click", function (event) {
      event.preventDefault();
      openViewer(image);
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

  function buildTable(images, xName, yName) {
    var xi = position[xName], yi = position[yName];
    var xs = distinct(images, xName), ys = distinct(images, yName);
    var cells = {};
    images.forEach(function (image) {
      var key = image.ax[yi] + "|" + image.ax[xi];
      (cells[key] = cells[key] || []).push(image);
    });
    var table = el("table", "xy");
    table.appendChild(buildHead(xName, yName, xs));
    var body = el("tbody");
    ys.forEach(function (y) {
      var row = el("tr");
      row.appendChild(labelCell("th", "row", yName, y));
      xs.forEach(function (x) {
        var td = el("td");
        (cells[y + "|" + x] || []).forEach(function (image) { td.appendChild(thumbnail(image)); });
        if (!td.firstChild) { td.appendChild(el("span", "muted", "—")); }
        row.appendChild(td);
      });
      body.appendChild(row);
    });
    table.appendChild(body);
    return table;
  }

  function render() {
    var x = selects.x.value, y = selects.y.value, z = selects.z.value;
    var roles = [x, y, z];
    document.querySelectorAll(".filters .filter").forEach(function (label) {
      label.hidden = roles.indexOf(label.dataset.axis) >= 0;
    });
    var images = matchingImages(roles);
    var parts = [];
    if (!images.length) {
      parts.push(el("p", "muted", "No image matches the current filters."));
    }
    var zs = z ? distinct(images, z) : [null];
    zs.forEach(function (zValue) {
      var subset = images;
      if (zValue !== null) {
        subset = images.filter(function (image) { return image.ax[position[z]] === zValue; });
        var zAxis = axes[position[z]];
        parts.push(el("h3", "z-title", zAxis.label + " = " + zAxis.titles[zValue]));
      }
      if (subset.length) {
        var wrap = el("div", "grid-wrap");
        wrap.appendChild(buildTable(subset, x, y));
        parts.push(wrap);
      }
    });
    grids.replaceChildren.apply(grids, parts);
  }

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

  function openViewer(image) {
    var dialog = document.getElementById("viewer");
    var pairs = params(image);
    var p = {};
    pairs.forEach(function (pair) { p[pair[0]] = pair[1]; });
    document.getElementById("viewer-title").textContent = p.base_model + " · rank " + p.rank +
      " · step " + p.checkpoint_step + " · " + p.sampler + " · weight " + p.lora_weight + " · seed " + p.seed +
      (p.extra_loras ? " · " + p.extra_loras : "");
    var img = el("img");
    img.id = "viewer-img";
    img.src = image.src;
    img.alt = p.prompt;
    var link = document.getElementById("viewer-link");
    link.href = image.src;
    link.replaceChildren(img);
    fillTable(document.getElementById("viewer-params"), pairs);
    var metrics = image.metrics.map(function (m) {
      var value = el("span", "metric-value", m.value);
      value.appendChild(el("span", "muted metric-direction", m.better));
      return [m.name, value, referenceNode(m.ref)];
    });
    fillTable(document.getElementById("viewer-metrics"), metrics.length ? metrics : [["—", "no metrics recorded"]]);
    if (!dialog.open) { dialog.showModal(); }
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
      selects[role].addEventListener("change", function () { resolveClash(role); render(); });
    });
    document.querySelectorAll(".filters select").forEach(function (select) {
      select.addEventListener("change", render);
    });
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

  setupViewer();
  setupControls();
  render();
})();
