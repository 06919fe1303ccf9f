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
