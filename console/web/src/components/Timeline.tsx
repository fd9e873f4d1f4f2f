// A Gantt chart of attempts: one row per step (a map step is one row), one bar per attempt.
import { absTime, fmtDuration, fmtInt, stepStateName, tsMs } from "../format";
import type { RunStore } from "../runstore";

const MAX_ROWS = 300;

export function Timeline({ store, now, onSelect }: { store: RunStore; now: number; onSelect: (id: string) => void }) {
  const run = store.run;
  if (!run) return null;
  const t0 = tsMs(run.createdAt) ?? now;
  // The end: the run's, or now — but never before the latest instant an event named, since
  // the browser's clock may lag the server's (and `now` ticks once a second).
  let latest = 0;
  for (const spans of store.attempts.values()) for (const s of spans) latest = Math.max(latest, s.end ?? s.start);
  const t1 = Math.max(t0 + 1000, tsMs(run.finishedAt) ?? Math.max(now, latest));
  const span = t1 - t0;
  const rows = store.order.slice(0, MAX_ROWS);
  const ticks = [0, 0.25, 0.5, 0.75, 1];

  return (
    <div class="timeline" data-testid="timeline">
      <div class="tl-axis">
        <span class="tl-label" />
        <span class="tl-track">
          {ticks.map((f) => (
            <span class="tl-tick" key={f} style={{ left: `${f * 100}%` }} title={absTime(t0 + f * span)}>
              {f === 0 ? "0" : "+" + fmtDuration(f * span)}
            </span>
          ))}
        </span>
      </div>
      {rows.map((id) => {
        const step = store.steps.get(id);
        const spans = store.attempts.get(id) ?? [];
        const earlier = step && spans.length ? spans[0].attempt - 1 : 0;
        return (
          <div class="tl-row" key={id} data-testid="timeline-row" data-step-id={id}>
            <span class="tl-label" title={id}>
              <button type="button" class="link" onClick={() => onSelect(id)}>
                {id}
              </button>
              {step?.itemCount ? <span class="muted small"> ×{fmtInt(step.itemCount)}</span> : null}
            </span>
            <span class="tl-track">
              {spans.map((s) => {
                const end = s.end ?? now;
                const st = s.state !== undefined ? stepStateName(s.state) : "RUNNING";
                const left = Math.max(0, ((s.start - t0) / span) * 100);
                const width = Math.min(100 - left, Math.max(0.25, ((end - s.start) / span) * 100));
                return (
                  <span
                    key={s.attempt}
                    data-testid="timeline-bar"
                    data-step-id={id}
                    data-attempt={s.attempt}
                    class={`tl-bar st-${s.end === undefined ? "RUNNING" : st}`}
                    style={{ left: `${left.toFixed(3)}%`, width: `${width.toFixed(3)}%` }}
                    title={`${id} attempt ${s.attempt}: ${s.end === undefined ? "running" : st}, ${fmtDuration(end - s.start)}\n${absTime(s.start)}${s.end !== undefined ? " → " + absTime(s.end) : ""}`}
                  />
                );
              })}
              {earlier > 0 ? (
                <span class="tl-note" title="attempts that ended before this page was opened are not in the API's step record">
                  {earlier} earlier attempt{earlier === 1 ? "" : "s"}
                </span>
              ) : null}
            </span>
          </div>
        );
      })}
      {store.order.length > MAX_ROWS ? (
        <p class="muted small">and {fmtInt(store.order.length - MAX_ROWS)} more steps</p>
      ) : null}
    </div>
  );
}
