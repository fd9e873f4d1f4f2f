// The DAG as SVG. The layout comes in ready-made (computed when the node set changes); this
// component only paints states, so re-rendering on every batch of events is cheap.
import { useEffect, useRef, useState } from "preact/hooks";
import type { Graph, Layout } from "../dag";
import { truncate } from "../format";

/** What a node shows besides its id and detail; absent in a spec preview. */
export interface NodeView {
  /** Short state name: the data-state attribute and the colour. */
  state: string;
  /** An extra class, e.g. "approval" for a step waiting for one. */
  cls?: string;
  attempt?: number;
  /** The third line: worker, waiting reason, item counts... */
  line?: string;
  progress: number;
  progressMessage?: string;
  title?: string;
}

interface Props {
  graph: Graph;
  layout: Layout;
  view?: (id: string) => NodeView | undefined;
  selected?: string;
  onSelect?: (id: string) => void;
}

/** Fit to width shrinks no further than this (text stays legible; the box scrolls instead). */
const MIN_FIT = 0.6;
const MIN_SCALE = 0.25;
const RENDERED_MARK = "dagmesh:dag-rendered";

export function DagView({ graph, layout, view, selected, onSelect }: Props) {
  const box = useRef<HTMLDivElement>(null);
  const [width, setWidth] = useState(0);
  // null: fit to the container's width (never above 1:1); a number: the user zoomed.
  const [zoom, setZoom] = useState<number | null>(null);

  useEffect(() => {
    const el = box.current;
    if (!el) return;
    const ro = new ResizeObserver(() => setWidth(el.clientWidth));
    ro.observe(el);
    setWidth(el.clientWidth);
    return () => ro.disconnect();
  }, []);

  // The first graph drawn on this page load leaves a performance mark (after the commit to the
  // DOM): the browser test reads from it how long a big run took to appear.
  useEffect(() => {
    if (graph.nodes.length > 0 && performance.getEntriesByName(RENDERED_MARK).length === 0) {
      performance.mark(RENDERED_MARK);
    }
  });

  if (graph.nodes.length === 0) {
    return <p class="muted">No steps.</p>;
  }
  const fit = width > 0 ? Math.max(MIN_FIT, Math.min(1, (width - 4) / Math.max(1, layout.width))) : 1;
  const scale = zoom ?? fit;

  return (
    <div class="dag">
      <div class="dag-tools">
        <button type="button" title="zoom out" onClick={() => setZoom(Math.max(MIN_SCALE, scale / 1.25))}>
          −
        </button>
        <button type="button" title="fit to width" onClick={() => setZoom(null)} class={zoom === null ? "on" : ""}>
          fit
        </button>
        <button type="button" title="zoom in" onClick={() => setZoom(Math.min(2, scale * 1.25))}>
          +
        </button>
        <span class="muted small">{graph.nodes.length} nodes</span>
      </div>
      <div class="dag-scroll" ref={box}>
        <svg
          data-testid="dag"
          width={Math.ceil(layout.width * scale)}
          height={Math.ceil(layout.height * scale)}
          viewBox={`0 0 ${layout.width} ${layout.height}`}
        >
          <defs>
            <marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">
              <path d="M0,0L10,5L0,10z" class="arrowhead" />
            </marker>
          </defs>
          <g class="edges">
            {layout.edges.map((e) => (
              <path key={`${e.from}>${e.to}`} d={e.d} class={e.dashed ? "edge dashed" : "edge"} marker-end="url(#arrow)" />
            ))}
          </g>
          {graph.nodes.map((n) => {
            const b = layout.nodes.get(n.id);
            if (!b) return null;
            const v = view?.(n.id);
            const st = v?.state ?? "";
            const cls = ["node", st ? `st-${st}` : "preview", v?.cls ?? "", n.isMap ? "map" : "", n.hook ? "hook" : "", selected === n.id ? "selected" : ""]
              .filter(Boolean)
              .join(" ");
            const inner = b.w - 20;
            return (
              <g
                key={n.id}
                data-testid="node"
                data-step-id={n.id}
                data-state={st}
                class={cls}
                transform={`translate(${b.x},${b.y})`}
                onClick={onSelect ? () => onSelect(n.id) : undefined}
              >
                <title>{v?.title ?? `${n.id}\n${n.detail}`}</title>
                {n.isMap ? <rect class="stack" x={5} y={-5} width={b.w} height={b.h} rx={7} /> : null}
                <rect class="box" width={b.w} height={b.h} rx={7} />
                <text class="id" x={10} y={19}>
                  {truncate(n.id, v?.attempt ? 20 : 26)}
                  {n.hook ? <tspan class="muted"> ({n.hook})</tspan> : null}
                </text>
                {v?.attempt ? (
                  <text class="attempt" x={b.w - 10} y={19} text-anchor="end">
                    #{v.attempt}
                  </text>
                ) : null}
                <text class="detail" x={10} y={36}>
                  {truncate(n.detail, 32)}
                </text>
                {v?.line ? (
                  <text class="line" x={10} y={53}>
                    {truncate(v.line, 34)}
                  </text>
                ) : null}
                {v ? (
                  <>
                    <rect class="track" x={10} y={61} width={inner} height={6} rx={3} />
                    <rect
                      data-testid="progress"
                      data-value={String(round3(v.progress))}
                      class="fill"
                      x={10}
                      y={61}
                      width={inner * clamp01(v.progress)}
                      height={6}
                      rx={3}
                    />
                    {v.progressMessage && v.progressMessage !== v.line ? (
                      <text class="pmsg" x={10} y={79}>
                        {truncate(v.progressMessage, 36)}
                      </text>
                    ) : null}
                  </>
                ) : null}
              </g>
            );
          })}
        </svg>
      </div>
    </div>
  );
}

function clamp01(x: number): number {
  return Number.isFinite(x) ? Math.min(1, Math.max(0, x)) : 0;
}

function round3(x: number): number {
  return Math.round(clamp01(x) * 1000) / 1000;
}
