// The graph of a workflow as the console draws it, and its layout. A map step is ONE node
// whatever its item count, so the layout depends on the workflow only: it is computed when the
// set of nodes changes, never when states do.
import { graphlib, layout as dagreLayout } from "@dagrejs/dagre";
import type { StepSpec, WorkflowSpec } from "./gen/dagmesh/v1/types_pb";

export type HookKind = "on_exit" | "on_success" | "on_failure";

export interface GraphNode {
  id: string;
  /** What the step does: the task requirement, "workflow mesh@2", "sleep 10m"... */
  detail: string;
  isMap: boolean;
  isApproval: boolean;
  hook?: HookKind;
}

export interface GraphEdge {
  from: string;
  to: string;
  /** Hooks run after the DAG: drawn dashed from its last steps. */
  dashed?: boolean;
}

export interface Graph {
  nodes: GraphNode[];
  edges: GraphEdge[];
}

export interface NodeBox {
  x: number;
  y: number;
  w: number;
  h: number;
}

export interface EdgePath {
  from: string;
  to: string;
  dashed?: boolean;
  d: string;
}

export interface Layout {
  width: number;
  height: number;
  nodes: Map<string, NodeBox>;
  edges: EdgePath[];
}

export const NODE_W = 224;
export const NODE_H = 86;
const NODE_SEP = 22;
const RANK_SEP = 60;
const MARGIN = 16;
/** Above this, dagre's ordering passes take seconds: a plain layered layout instead. */
const DAGRE_MAX_NODES = 1500;

export function stepDetail(spec: StepSpec): string {
  let what = spec.task;
  if (spec.workflow) what = `workflow ${spec.workflow}`;
  else if (spec.sleep) what = `sleep ${spec.sleep}`;
  else if (spec.approval) what = "approval";
  else if (spec.waitFor) what = `wait for ${spec.waitFor.topic}`;
  return spec.forEach ? `map · ${what}` : what;
}

/** The graph of a workflow spec; `extra` adds steps the run has that the spec lacks. */
export function specGraph(spec: WorkflowSpec | undefined, extra: GraphNode[] = []): Graph {
  const nodes: GraphNode[] = [];
  const edges: GraphEdge[] = [];
  const seen = new Set<string>();
  const add = (node: GraphNode) => {
    if (seen.has(node.id)) return;
    seen.add(node.id);
    nodes.push(node);
  };
  const fromSpec = (s: StepSpec, hook?: HookKind): GraphNode => ({
    id: s.id,
    detail: stepDetail(s),
    isMap: s.forEach !== "",
    isApproval: s.approval !== undefined,
    hook,
  });
  if (spec) {
    for (const s of spec.steps) {
      add(fromSpec(s));
      for (const need of s.needs) edges.push({ from: need, to: s.id });
    }
  }
  for (const node of extra) if (!node.hook) add(node);
  const dagIds = nodes.map((n) => n.id);
  const hooks: GraphNode[] = [];
  if (spec) {
    for (const s of spec.onExit) hooks.push(fromSpec(s, "on_exit"));
    for (const s of spec.onSuccess) hooks.push(fromSpec(s, "on_success"));
    for (const s of spec.onFailure) hooks.push(fromSpec(s, "on_failure"));
  }
  for (const node of extra) if (node.hook) hooks.push(node);
  for (const hook of hooks) add(hook);
  if (hooks.length) {
    const hasOut = new Set(edges.map((e) => e.from));
    const sinks = dagIds.filter((id) => !hasOut.has(id));
    // Every sink to every hook would be a thicket on wide graphs; then the hooks stand alone.
    if (sinks.length * hooks.length <= 64) {
      for (const hook of hooks) for (const sink of sinks) edges.push({ from: sink, to: hook.id, dashed: true });
    }
  }
  const known = new Set(nodes.map((n) => n.id));
  return { nodes, edges: edges.filter((e) => known.has(e.from) && known.has(e.to)) };
}

/** A key that changes exactly when the layout would. */
export function graphKey(g: Graph): string {
  return g.nodes.map((n) => n.id).join("\n") + "\n--\n" + g.edges.map((e) => `${e.from}>${e.to}`).join("\n");
}

export function layoutGraph(g: Graph): Layout {
  if (g.nodes.length === 0) return { width: 0, height: 0, nodes: new Map(), edges: [] };
  return g.nodes.length > DAGRE_MAX_NODES ? layeredLayout(g) : dagreLayoutOf(g);
}

function dagreLayoutOf(g: Graph): Layout {
  const dg = new graphlib.Graph();
  dg.setGraph({ rankdir: "LR", nodesep: NODE_SEP, ranksep: RANK_SEP, marginx: MARGIN, marginy: MARGIN });
  dg.setDefaultEdgeLabel(() => ({}));
  for (const n of g.nodes) dg.setNode(n.id, { width: NODE_W, height: NODE_H });
  for (const e of g.edges) dg.setEdge(e.from, e.to);
  dagreLayout(dg);
  const nodes = new Map<string, NodeBox>();
  for (const n of g.nodes) {
    const v = dg.node(n.id) as { x: number; y: number };
    nodes.set(n.id, { x: v.x - NODE_W / 2, y: v.y - NODE_H / 2, w: NODE_W, h: NODE_H });
  }
  const edges = g.edges.map((e) => {
    const label = dg.edge(e.from, e.to) as { points?: { x: number; y: number }[] } | undefined;
    const points = label?.points ?? [];
    return { from: e.from, to: e.to, dashed: e.dashed, d: pathOf(points) };
  });
  const info = dg.graph() as { width?: number; height?: number };
  return { width: Math.ceil(info.width ?? 0), height: Math.ceil(info.height ?? 0), nodes, edges };
}

/** Columns by longest path from the sources; rows in spec order. Linear time. */
function layeredLayout(g: Graph): Layout {
  const index = new Map(g.nodes.map((n, i) => [n.id, i]));
  const out: number[][] = g.nodes.map(() => []);
  const indegree = g.nodes.map(() => 0);
  for (const e of g.edges) {
    const a = index.get(e.from)!;
    const b = index.get(e.to)!;
    out[a].push(b);
    indegree[b]++;
  }
  const rank = g.nodes.map(() => 0);
  const queue: number[] = [];
  indegree.forEach((d, i) => d === 0 && queue.push(i));
  for (let head = 0; head < queue.length; head++) {
    const a = queue[head];
    for (const b of out[a]) {
      rank[b] = Math.max(rank[b], rank[a] + 1);
      if (--indegree[b] === 0) queue.push(b);
    }
  }
  const rows: number[] = [];
  const nodes = new Map<string, NodeBox>();
  let width = 0;
  let height = 0;
  g.nodes.forEach((n, i) => {
    const r = rank[i];
    const row = rows[r] ?? 0;
    rows[r] = row + 1;
    const box = { x: MARGIN + r * (NODE_W + RANK_SEP), y: MARGIN + row * (NODE_H + NODE_SEP), w: NODE_W, h: NODE_H };
    nodes.set(n.id, box);
    width = Math.max(width, box.x + NODE_W + MARGIN);
    height = Math.max(height, box.y + NODE_H + MARGIN);
  });
  const edges = g.edges.map((e) => {
    const a = nodes.get(e.from)!;
    const b = nodes.get(e.to)!;
    const points = [
      { x: a.x + a.w, y: a.y + a.h / 2 },
      { x: b.x, y: b.y + b.h / 2 },
    ];
    return { from: e.from, to: e.to, dashed: e.dashed, d: pathOf(points) };
  });
  return { width, height, nodes, edges };
}

/** A smooth path through dagre's edge points (a polyline with quadratic corners). */
function pathOf(points: { x: number; y: number }[]): string {
  if (points.length === 0) return "";
  const r = (n: number) => Math.round(n * 10) / 10;
  let d = `M${r(points[0].x)},${r(points[0].y)}`;
  if (points.length === 2) return d + `L${r(points[1].x)},${r(points[1].y)}`;
  for (let i = 1; i < points.length - 1; i++) {
    const p = points[i];
    const next = points[i + 1];
    const mid = i === points.length - 2 ? next : { x: (p.x + next.x) / 2, y: (p.y + next.y) / 2 };
    d += `Q${r(p.x)},${r(p.y)} ${r(mid.x)},${r(mid.y)}`;
  }
  return d;
}
