// Formatting of states, numbers, times and payloads.
import type { Duration, Timestamp } from "@bufbuild/protobuf/wkt";
import { RunState, StepState } from "./gen/dagmesh/v1/types_pb";

/** "RUNNING" for RunState.RUNNING: the enum name without its RUN_STATE_ prefix. */
export function runStateName(state: RunState): string {
  return RunState[state] ?? String(state);
}

/** "RETRY_WAIT" for StepState.RETRY_WAIT. */
export function stepStateName(state: StepState): string {
  return StepState[state] ?? String(state);
}

export const RUN_STATES = ["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"] as const;

export function runStateFromName(name: string): RunState {
  const value = (RunState as unknown as Record<string, number>)[name];
  return typeof value === "number" ? (value as RunState) : RunState.UNSPECIFIED;
}

export function runEnded(state: RunState | undefined): boolean {
  return state === RunState.SUCCEEDED || state === RunState.FAILED || state === RunState.CANCELLED;
}

export function stepEnded(state: StepState): boolean {
  return (
    state === StepState.SUCCEEDED ||
    state === StepState.FAILED ||
    state === StepState.SKIPPED ||
    state === StepState.CANCELLED
  );
}

const numberFormat = new Intl.NumberFormat("en-US");

/** 9812 -> "9,812". */
export function fmtInt(n: number | bigint): string {
  return numberFormat.format(n);
}

export function tsMs(ts: Timestamp | undefined): number | undefined {
  if (!ts) return undefined;
  return Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6);
}

export function durationPbMs(d: Duration | undefined): number | undefined {
  if (!d) return undefined;
  return Number(d.seconds) * 1000 + Math.floor(d.nanos / 1e6);
}

function pad(n: number, width = 2): string {
  return String(n).padStart(width, "0");
}

/** "2025-03-30 14:05:09" in the browser's zone. */
export function absTime(ms: number): string {
  const d = new Date(ms);
  return (
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
  );
}

/** "12 s ago", "3 min ago", "in 2 h". */
export function relTime(ms: number, now: number = Date.now()): string {
  const diff = now - ms;
  const future = diff < 0;
  const s = Math.abs(diff) / 1000;
  let text: string;
  if (s < 1.5) return "just now";
  if (s < 60) text = `${Math.round(s)} s`;
  else if (s < 3600) text = `${Math.round(s / 60)} min`;
  else if (s < 86400 * 2) text = `${Math.round(s / 3600)} h`;
  else text = `${Math.round(s / 86400)} d`;
  return future ? `in ${text}` : `${text} ago`;
}

/** "850 ms", "12.3 s", "4m 05s", "2h 03m", "3d 04h". */
export function fmtDuration(ms: number): string {
  if (!Number.isFinite(ms) || ms < 0) return "";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const total = Math.floor(s);
  const d = Math.floor(total / 86400);
  const h = Math.floor((total % 86400) / 3600);
  const m = Math.floor((total % 3600) / 60);
  const sec = total % 60;
  if (d > 0) return `${d}d ${pad(h)}h`;
  if (h > 0) return `${h}h ${pad(m)}m`;
  return `${m}m ${pad(sec)}s`;
}

/** Pretty JSON for payloads (Struct values arrive as plain JSON objects). */
export function prettyJson(value: unknown): string {
  if (value === undefined) return "";
  return JSON.stringify(value, null, 2);
}

/** "a=1, b=2" -> {a: "1", b: "2"}; null when a part has no `=`. */
export function parseTags(text: string): Record<string, string> | null {
  const tags: Record<string, string> = {};
  for (const part of text.split(",")) {
    const item = part.trim();
    if (!item) continue;
    const eq = item.indexOf("=");
    if (eq <= 0) return null;
    tags[item.slice(0, eq).trim()] = item.slice(eq + 1).trim();
  }
  return tags;
}

export function truncate(text: string, max: number): string {
  return text.length <= max ? text : text.slice(0, max - 1) + "…";
}

/** A worker instance id is long; its first part is enough to tell instances apart. */
export function shortId(id: string, keep = 8): string {
  return id.length <= keep + 1 ? id : id.slice(0, keep) + "…";
}
