"""The JavaScript the browser tests run in the JupyterLab page (through Playwright's page.evaluate).

They read JupyterLab's objects through `window.jupyterapp` (LabApp.expose_app_in_browser) and the
rendered DOM; `window.__nbf` holds what JS_SETUP records (the kernel's IOPub errors, Run All's state).
"""

JS_OPENED = """() => {
  const app = window.jupyterapp;
  const w = app && app.shell && app.shell.currentWidget;
  return !!(w && w.content && w.sessionContext && w.context);
}"""

JS_SETUP = """async () => {
  const app = window.jupyterapp, w = app.shell.currentWidget;
  await app.restored;
  await w.context.ready;
  await w.sessionContext.ready;
  app.shell.collapseLeft();
  app.shell.collapseRight();
  window.__nbf = {errors: [], runDone: false, runError: null};
  w.sessionContext.iopubMessage.connect((_, msg) => {
    if (msg.header.msg_type === 'error') {
      const c = msg.content;
      window.__nbf.errors.push({ename: c.ename, evalue: c.evalue, traceback: (c.traceback || []).join('\\n'),
                                parent: (msg.parent_header || {}).msg_type || ''});
    }
  });
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  return {path: w.context.path, kernel: k ? k.name : null, kernelId: k ? k.id : null, cells: w.content.widgets.length};
}"""

JS_RUN_ALL = """() => {
  const p = window.jupyterapp.commands.execute('notebook:run-all-cells');
  Promise.resolve(p).then(() => { window.__nbf.runDone = true; },
                          (e) => { window.__nbf.runDone = true; window.__nbf.runError = String(e); });
}"""

JS_STATE = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  const code = w.content.widgets.map((c, i) => [i, c]).filter(([i, c]) => c.model.type === 'code');
  const dialog = document.querySelector('.jp-Dialog');
  return {kernel: k ? k.status : 'none', runDone: window.__nbf.runDone, runError: window.__nbf.runError,
          cells: code.map(([i, c]) => ({index: i, count: c.model.executionCount, state: c.model.executionState})),
          dialog: dialog ? dialog.innerText : null};
}"""

JS_ERRORS = "() => window.__nbf.errors.slice()"

JS_KERNEL_ID = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return k ? k.id : null;
}"""

# Every code cell: its outputs as the model holds them, and what the page shows for each.
JS_INSPECT = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const box = (el) => { const r = el.getBoundingClientRect(); return [Math.round(r.width), Math.round(r.height)]; };
  // how much of an element's width a user sees: cut by every ancestor that clips (overflow-x not visible)
  const visibleWidth = (el) => {
    const r = el.getBoundingClientRect();
    let left = Math.max(r.left, 0), right = Math.min(r.right, window.innerWidth);
    for (let e = el.parentElement; e; e = e.parentElement) {
      if (getComputedStyle(e).overflowX !== 'visible') {
        const er = e.getBoundingClientRect();
        left = Math.max(left, er.left); right = Math.min(right, er.right);
      }
    }
    return Math.max(0, Math.round(right - left));
  };
  const plotInfo = (p) => {
    const svg = p.querySelector('svg.main-svg');
    return {size: box(p), svg: !!svg, visible: visibleWidth(p),
            traces: p.querySelectorAll('.trace, .hm, .contour, .pielayer .slice, .imagelayer image, .heatmaplayer image, .table-control-view').length,
            // a table's marks are its non-empty cells
            marks: p.querySelectorAll('.trace path, .trace rect, .trace image, .hm image, .pielayer path').length
                   + Array.from(p.querySelectorAll('.table-control-view .cell-text')).filter(t => t.textContent.trim()).length,
            title: (p.querySelector('.gtitle') || {textContent: ''}).textContent};
  };
  return w.content.widgets.map((cell, index) => {
    if (cell.model.type !== 'code') return null;
    const outputs = cell.model.outputs.toJSON().map(o => ({
      type: o.output_type, mimes: Object.keys(o.data || {}), name: o.name || null,
      ename: o.ename || null, evalue: o.evalue || null}));
    const nodes = Array.from(cell.node.querySelectorAll('.jp-Cell-outputArea > .jp-OutputArea-child > .jp-OutputArea-output, .jp-Cell-outputArea > .jp-OutputArea > .jp-OutputArea-child > .jp-OutputArea-output'));
    const shown = nodes.map(n => {
      const widgets = n.querySelector('.jupyter-widgets') !== null || n.classList.contains('jupyter-widgets');
      return {
        mime: n.dataset.mimeType || null, size: box(n), widget: widgets,
        text: n.innerText.slice(0, 400),
        broken: (n.innerText.match(/[^\\n]*(Error displaying widget|Failed to (load|create) (model|view)|Could not create (a )?view|javascript error)[^\\n]*/i) || [null])[0],
        plots: Array.from(n.querySelectorAll('.js-plotly-plot')).concat(n.classList.contains('js-plotly-plot') ? [n] : []).map(plotInfo),
        sliders: n.querySelectorAll('.widget-slider, .jupyter-widget-slider').length,
        buttons: Array.from(n.querySelectorAll('button.jupyter-button')).map(b => (b.innerText || b.title || '').trim()),
        texts: n.querySelectorAll('.widget-text input[type=text], .widget-textarea textarea').length,
        numbers: n.querySelectorAll('.widget-text input[type=number]').length,
      };
    });
    return {index, count: cell.model.executionCount, tags: cell.model.getMetadata('tags') || [], outputs, shown};
  }).filter(x => x !== null);
}"""

# What a user would see change: plot geometry and text of every output (not the controls' own values).
JS_SNAPSHOT = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const parts = {};
  w.content.widgets.forEach((cell, i) => {
    if (cell.model.type !== 'code') return;
    cell.node.querySelectorAll('.js-plotly-plot').forEach((p, j) => {
      const geo = Array.from(p.querySelectorAll('svg.main-svg path[d], svg.main-svg rect, svg.main-svg image'))
        .map(e => e.getAttribute('d') || [e.getAttribute('x'), e.getAttribute('y'), e.getAttribute('width'), e.getAttribute('height')].join(','));
      const txt = Array.from(p.querySelectorAll('svg.main-svg text')).map(t => t.textContent);
      parts[`cell ${i} plot ${j}`] = geo.join(' ') + ' | ' + txt.join(' ');
    });
    const area = cell.node.querySelector('.jp-Cell-outputArea');
    if (!area) return;
    const clone = area.cloneNode(true);
    clone.querySelectorAll('.js-plotly-plot, .widget-readout, input, textarea, button').forEach(e => e.remove());
    parts[`cell ${i} text`] = clone.textContent;
    const selects = Array.from(area.querySelectorAll('select')).map(s => Array.from(s.options).map(o => o.text + (o.selected ? '*' : '')).join('|'));
    parts[`cell ${i} lists`] = selects.join(' // ');
  });
  return parts;
}"""

JS_SCROLL_TOP = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const outer = w.node.querySelector('.jp-WindowedPanel-outer') || w.content.node;
  outer.scrollTop = 0;
  const cells = w.content.widgets;
  const last = cells.length ? cells[cells.length - 1].node.getBoundingClientRect() : {bottom: 0};
  return Math.ceil(last.bottom);  // page y of the last cell's bottom, scrolled to the top
}"""

# Can the text in the outputs be read? Three measures, each a list of what is wrong (plots' insides are left to 4.):
# 1. overflows: an element (not a plot) whose text runs past its own box, where that box neither scrolls nor clips
#    (overflow-x visible, scrollWidth > clientWidth + 1); only the innermost such box, not every ancestor it widens.
#    Not counted: a list box's options (the list box clips them), and a table in an HTML output that is not a widget
#    (a wide DataFrame scrolls with its output, overflow-x: auto, as JupyterLab shows every DataFrame).
# 2. overlaps: two runs of text (or a text run and an input field) of distinct elements, neither inside the other,
#    whose boxes intersect by more than 2 px each way and by more than a quarter of the lower one's height (a line
#    box is often a little taller than its line-height); each box is first cut by the ancestors in its output that
#    clip it, as a user sees it. Within and across cells.
# 3. legends: a plotly legend's box over the plot's title or an annotation (subplot titles are annotations).
JS_LAYOUT = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const say = (s, n = 50) => { s = (s || '').replace(/\\s+/g, ' ').trim(); return s.length > n ? s.slice(0, n - 1) + '…' : s; };
  const tag = (e) => [e.tagName.toLowerCase()].concat(Array.from(e.classList)
    .filter(c => !/^(lm-|jupyter-widgets$|widget-inline-)/.test(c)).slice(0, 2)).join('.');
  const inPlot = (e) => !!e.closest('.js-plotly-plot, svg');
  const overlap = (a, b) => [Math.min(a.right, b.right) - Math.max(a.left, b.left), Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top)];
  const clipped = (r, el, out) => {  // the part of box r of el not cut away by an ancestor (up to its output) that clips
    let {left, right, top, bottom} = r;
    for (let e = el; e; e = e === out ? null : e.parentElement) {
      const cs = getComputedStyle(e);
      if (cs.overflowX === 'visible' && cs.overflowY === 'visible') continue;
      const b = e.getBoundingClientRect();
      if (cs.overflowX !== 'visible') { left = Math.max(left, b.left); right = Math.min(right, b.right); }
      if (cs.overflowY !== 'visible') { top = Math.max(top, b.top); bottom = Math.min(bottom, b.bottom); }
    }
    return {left, right, top, bottom};
  };
  const text = (e) => {  // the text a user reads in e, plots left out
    const walk = document.createTreeWalker(e, NodeFilter.SHOW_TEXT);
    let s = '';
    for (let t = walk.nextNode(); t && s.length < 200; t = walk.nextNode())
      if (!inPlot(t.parentElement) && !t.parentElement.closest('script, style')) s += t.textContent;
    return s.trim();
  };
  const overflows = [], boxes = [], legends = [];
  w.content.widgets.forEach((cell, index) => {
    if (cell.model.type !== 'code') return;
    const outs = Array.from(cell.node.querySelectorAll('.jp-OutputArea-output'));
    let wide = [];
    for (const out of outs) for (const e of out.querySelectorAll('*')) {
      if (e.clientWidth === 0 || e.scrollWidth <= e.clientWidth + 1 || inPlot(e) || e.closest('select')) continue;
      if (!e.closest('.jupyter-widgets') && Array.from(e.children).some(c => c.tagName === 'TABLE')) continue;
      if (getComputedStyle(e).overflowX === 'visible' && text(e)) wide.push(e);
    }
    wide.filter(e => !wide.some(o => o !== e && e.contains(o))).forEach(e =>
      overflows.push({cell: index, what: tag(e), text: say(text(e)), width: e.scrollWidth, box: e.clientWidth}));
    const range = document.createRange();
    for (const out of outs) {
      const walk = document.createTreeWalker(out, NodeFilter.SHOW_TEXT);
      for (let t = walk.nextNode(); t; t = walk.nextNode()) {
        const el = t.parentElement;
        if (!t.textContent.trim() || inPlot(el) || el.closest('option, script, style')) continue;
        if (getComputedStyle(el).visibility !== 'visible') continue;
        range.selectNodeContents(t);
        for (const r of range.getClientRects()) boxes.push({cell: index, el, text: t.textContent, r: clipped(r, el, out)});
      }
      for (const el of out.querySelectorAll('input:not([type=hidden]), textarea, select')) {
        if (!inPlot(el) && getComputedStyle(el).visibility === 'visible')
          boxes.push({cell: index, el, text: el.value || el.placeholder || tag(el), r: clipped(el.getBoundingClientRect(), el, out)});
      }
      const plots = out.classList.contains('js-plotly-plot') ? [out] : Array.from(out.querySelectorAll('.js-plotly-plot'));
      for (const p of plots) {
        const bg = p.querySelector('.legend rect.bg');
        if (!bg) continue;
        const lr = bg.getBoundingClientRect();
        for (const t of p.querySelectorAll('.gtitle, .annotation-text')) {
          const [ox, oy] = overlap(lr, t.getBoundingClientRect());
          if (ox > 2 && oy > 2 && t.textContent.trim())
            legends.push({cell: index, plot: say((p.querySelector('.gtitle') || {textContent: ''}).textContent),
                          covers: t.classList.contains('gtitle') ? 'title' : 'subplot title / annotation',
                          text: say(t.textContent), size: [Math.round(ox), Math.round(oy)]});
        }
      }
    }
  });
  // a sweep down the page: each box against those that start above its bottom
  const shown = boxes.filter(b => b.r.right - b.r.left > 1 && b.r.bottom - b.r.top > 1).sort((a, b) => a.r.top - b.r.top);
  const ids = new Map(), pairs = new Map();
  const id = (el) => { if (!ids.has(el)) ids.set(el, ids.size); return ids.get(el); };
  for (let i = 0; i < shown.length && pairs.size < 200; i++) {
    const a = shown[i];
    for (let j = i + 1; j < shown.length && shown[j].r.top < a.r.bottom; j++) {
      const b = shown[j];
      if (a.el.contains(b.el) || b.el.contains(a.el)) continue;
      const [ox, oy] = overlap(a.r, b.r);
      if (ox <= 2 || oy <= 2 || oy <= 0.25 * Math.min(a.r.bottom - a.r.top, b.r.bottom - b.r.top)) continue;
      const key = id(a.el) + ' ' + id(b.el);
      if (!pairs.has(key))
        pairs.set(key, {cell: a.cell, other: b.cell, a: say(a.text), b: say(b.text), size: [Math.round(ox), Math.round(oy)]});
    }
  }
  return {overflows, overlaps: Array.from(pairs.values()), legends, texts: shown.length};
}"""

# Mark each rich output (not printed text, not an error) with data-nbf-shot="cellNN-K" (NN: the cell's index in the
# notebook, K: the output's place in it, from 1) for LabNotebook.screenshot_outputs; returns the names.
JS_MARK_OUTPUTS = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const plain = ['application/vnd.jupyter.stdout', 'application/vnd.jupyter.stderr', 'text/plain'];
  const names = [];
  w.content.widgets.forEach((cell, index) => {
    if (cell.model.type !== 'code') return;
    const nodes = cell.node.querySelectorAll('.jp-Cell-outputArea > .jp-OutputArea-child > .jp-OutputArea-output, .jp-Cell-outputArea > .jp-OutputArea > .jp-OutputArea-child > .jp-OutputArea-output');
    nodes.forEach((n, k) => {
      const r = n.getBoundingClientRect();
      if (plain.includes(n.dataset.mimeType) || r.width < 2 || r.height < 2) return;
      const name = `cell${String(index).padStart(2, '0')}-${k + 1}`;
      n.dataset.nbfShot = name;
      names.push(name);
    });
  });
  return names;
}"""
