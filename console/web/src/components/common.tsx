// Small pieces shared by the pages, and the polling hook.
import type { ComponentChildren } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import type { CallError } from "../api";
import { absTime, fmtDuration, prettyJson, relTime } from "../format";
import { href } from "../router";

/** The banner every failed call ends up in: which call, the code and the server's words. */
export function ErrorBanner({ error, note }: { error: CallError | null | undefined; note?: string }) {
  if (!error) return null;
  return (
    <div class="banner error" data-testid="error" role="alert">
      <strong>{error.call}</strong> failed: {error.message || "(no message)"}{" "}
      <span class="code">{error.codeName}</span>
      {note ? <span class="note"> — {note}</span> : null}
    </div>
  );
}

export function Notice({ text, onClose }: { text: string | null; onClose?: () => void }) {
  if (!text) return null;
  return (
    <div class="banner notice" data-testid="notice" role="status">
      {text}
      {onClose ? (
        <button type="button" class="link close" onClick={onClose} aria-label="dismiss">
          ×
        </button>
      ) : null}
    </div>
  );
}

/** A state badge; `state` is the short name (RUNNING), which is also its CSS class. */
export function StateBadge({ state, label, testid }: { state: string; label?: string; testid?: string }) {
  return (
    <span class={`badge st-${state}`} data-testid={testid}>
      {label ?? state}
    </span>
  );
}

/** "3 min ago", with the absolute time on hover. */
export function TimeAgo({ ms, now }: { ms: number | undefined; now?: number }) {
  if (ms === undefined) return <span class="muted">—</span>;
  return (
    <time dateTime={new Date(ms).toISOString()} title={absTime(ms)}>
      {relTime(ms, now)}
    </time>
  );
}

/** Time between two instants (the second defaults to now: still going). */
export function Elapsed({ from, to, now }: { from: number | undefined; to: number | undefined; now: number }) {
  if (from === undefined) return <span class="muted">—</span>;
  const end = to ?? now;
  return <span title={to === undefined ? "still going" : undefined}>{fmtDuration(Math.max(0, end - from))}</span>;
}

export function Tags({ tags, onPick }: { tags: Record<string, string>; onPick?: (tag: string) => void }) {
  const entries = Object.entries(tags).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  if (entries.length === 0) return null;
  return (
    <span class="tags">
      {entries.map(([k, v]) =>
        onPick ? (
          <button type="button" class="tag" key={k} title="filter by this tag" onClick={() => onPick(`${k}=${v}`)}>
            {k}={v}
          </button>
        ) : (
          <span class="tag" key={k}>
            {k}={v}
          </span>
        ),
      )}
    </span>
  );
}

export function RunLink({ id, short }: { id: string; short?: boolean }) {
  return (
    <a href={href(["runs", id])} class="mono" title={id}>
      {short ? id.slice(0, 8) + "…" + id.slice(-4) : id}
    </a>
  );
}

export function Json({ value, testid }: { value: unknown; testid?: string }) {
  if (value === undefined) return <span class="muted">—</span>;
  return (
    <pre class="json" data-testid={testid}>
      {prettyJson(value)}
    </pre>
  );
}

/** A horizontal bar: `parts` are [fraction, class] pairs drawn left to right. */
export function Bar({ parts, title, testid }: { parts: [number, string][]; title?: string; testid?: string }) {
  return (
    <span class="bar" title={title} data-testid={testid}>
      {parts.map(([f, cls], i) =>
        f > 0 ? <span key={i} class={`fill ${cls}`} style={{ width: `${Math.min(100, f * 100)}%` }} /> : null,
      )}
    </span>
  );
}

export function Section({ title, children, actions }: { title: string; children: ComponentChildren; actions?: ComponentChildren }) {
  return (
    <section class="card">
      <div class="card-head">
        <h2>{title}</h2>
        {actions}
      </div>
      {children}
    </section>
  );
}

/** The current time, refreshed every `ms` (for "x s ago" and running durations). */
export function useNow(ms = 1000): number {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const timer = setInterval(() => setNow(Date.now()), ms);
    return () => clearInterval(timer);
  }, [ms]);
  return now;
}

/**
 * Runs `load` now and then `intervalMs` after each completion (never two at once, so a slow
 * server is not piled on), until the deps change or the component goes. Paused while the tab
 * is hidden.
 */
export function usePoll(load: (signal: AbortSignal) => Promise<void>, intervalMs: number, deps: unknown[]): void {
  const loadRef = useRef(load);
  loadRef.current = load;
  useEffect(() => {
    const ctl = new AbortController();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const tick = async () => {
      if (ctl.signal.aborted) return;
      if (!document.hidden) {
        try {
          await loadRef.current(ctl.signal);
        } catch {
          // load reports its own errors
        }
      }
      if (!ctl.signal.aborted) timer = setTimeout(tick, intervalMs);
    };
    void tick();
    return () => {
      ctl.abort();
      clearTimeout(timer);
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, deps);
}
