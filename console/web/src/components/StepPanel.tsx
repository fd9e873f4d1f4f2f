// The panel of the selected step: what it is, what it got and gave, its logs; for a map step,
// its items in a virtualised list (only the visible rows are in the DOM).
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import { type CallError, describeError, isTransient, runClient, sleep } from "../api";
import { stepDetail } from "../dag";
import { absTime, fmtDuration, fmtInt, shortId, stepStateName, truncate, tsMs } from "../format";
import { type Step, StepState, type StepSpec } from "../gen/dagmesh/v1/types_pb";
import type { RunStore } from "../runstore";
import { Elapsed, ErrorBanner, Json, RunLink, StateBadge, TimeAgo } from "./common";

interface Props {
  store: RunStore;
  stepId: string;
  spec: StepSpec | undefined;
  /** An exit hook: RetryRun's from_step may not name it. */
  isHook: boolean;
  runEnded: boolean;
  now: number;
  /** Bumped after an action: logs reconnect (a retried run produces new lines). */
  epoch: number;
  onSelect: (id: string) => void;
  onClose: () => void;
  onRetryFrom?: (stepId: string) => void;
  busy: boolean;
}

export function StepPanel({ store, stepId, spec, isHook, runEnded, now, epoch, onSelect, onClose, onRetryFrom, busy }: Props) {
  const step = store.steps.get(stepId);
  const isItem = !!step?.mapStep;
  const isMap = !!spec?.forEach || (step?.itemCount ?? 0) > 0 || store.items.has(stepId);
  const st = step ? stepStateName(step.state) : "PENDING";

  return (
    <aside class="card step-panel" data-testid="step-panel" data-step-id={stepId} data-state={st}>
      <div class="card-head">
        <h2>
          {isItem ? (
            <>
              <button type="button" class="link" onClick={() => onSelect(step!.mapStep)} data-testid="back-to-map">
                {step!.mapStep}
              </button>{" "}
              › item {step!.itemIndex}
            </>
          ) : (
            <span class="mono">{stepId}</span>
          )}{" "}
          <StateBadge state={st} />
          {step?.cachedFrom ? <StateBadge state="CACHED" label="cached" /> : null}
        </h2>
        <div class="actions">
          {onRetryFrom && runEnded && !isItem && !isHook ? (
            <button
              type="button"
              data-testid="action-retry-from"
              disabled={busy}
              onClick={() => onRetryFrom(stepId)}
              title="RetryRun with from_step: this step and everything downstream run again"
            >
              Retry from this step
            </button>
          ) : null}
          <button type="button" class="link close" onClick={onClose} aria-label="close">
            ×
          </button>
        </div>
      </div>
      {!step ? <p class="muted">This step has not started yet (it has no record in the run).</p> : null}
      <dl class="facts">
        <dt>Does</dt>
        <dd class="mono">{spec ? stepDetail(spec) : step?.task || "—"}</dd>
        {step?.taskVersion ? (
          <>
            <dt>Task version</dt>
            <dd class="mono">{step.taskVersion}</dd>
          </>
        ) : null}
        {spec?.needs.length ? (
          <>
            <dt>Needs</dt>
            <dd>
              {spec.needs.map((n) => (
                <button type="button" class="link mono" key={n} onClick={() => onSelect(n)}>
                  {n}{" "}
                </button>
              ))}
            </dd>
          </>
        ) : null}
        {step && !isMap ? (
          <>
            <dt>Attempt</dt>
            <dd>
              {step.attempt || "not yet"}
              {spec?.retry?.maxAttempts ? <span class="muted"> of {spec.retry.maxAttempts}</span> : null}
              {step.lostAttempts ? <span class="muted"> (+{step.lostAttempts} lost to vanished workers or retries)</span> : null}
            </dd>
            <dt>Worker</dt>
            <dd class="mono" title={step.worker}>
              {step.worker || "—"}
              {step.workerPrincipal ? <span class="muted"> ({step.workerPrincipal})</span> : null}
            </dd>
          </>
        ) : null}
        {step ? (
          <>
            <dt>Started</dt>
            <dd>
              <TimeAgo ms={tsMs(step.startedAt)} now={now} />
            </dd>
            <dt>Finished</dt>
            <dd>
              <TimeAgo ms={tsMs(step.finishedAt)} now={now} />
            </dd>
            <dt>Took</dt>
            <dd>
              <Elapsed from={tsMs(step.startedAt)} to={tsMs(step.finishedAt)} now={now} />
            </dd>
            {step.progress > 0 || step.progressMessage ? (
              <>
                <dt>Progress</dt>
                <dd>
                  {Math.round(step.progress * 100)}% {step.progressMessage}
                </dd>
              </>
            ) : null}
            {step.waitingReason ? (
              <>
                <dt>Waiting</dt>
                <dd class="warn">{step.waitingReason}</dd>
              </>
            ) : null}
            {step.waitingFor ? (
              <>
                <dt>Waiting for</dt>
                <dd>
                  {step.waitingFor}
                  {step.wakeAt ? (
                    <span class="muted">
                      {" "}
                      (until <TimeAgo ms={tsMs(step.wakeAt)} now={now} />)
                    </span>
                  ) : null}
                </dd>
              </>
            ) : null}
            {step.childRunId ? (
              <>
                <dt>Child run</dt>
                <dd>
                  <RunLink id={step.childRunId} />
                </dd>
              </>
            ) : null}
            {step.cachedFrom ? (
              <>
                <dt>Outputs from</dt>
                <dd>
                  <RunLink id={step.cachedFrom} /> {step.cacheKey ? <span class="muted mono">key {shortId(step.cacheKey, 12)}</span> : null}
                </dd>
              </>
            ) : null}
          </>
        ) : null}
      </dl>
      {step?.error ? (
        <div class="step-error" data-testid="step-error">
          <h3>Error</h3>
          <pre>{step.error}</pre>
        </div>
      ) : null}
      {isMap && !isItem ? <MapItems store={store} mapId={stepId} onSelect={onSelect} now={now} /> : null}
      {step && !isMap ? (
        <div class="io">
          <div>
            <h3>Inputs</h3>
            <Json value={step.inputs} testid="step-inputs" />
          </div>
          <div>
            <h3>Outputs</h3>
            <Json value={step.outputs} testid="step-outputs" />
          </div>
        </div>
      ) : null}
      {spec && !isItem && Object.keys(spec.inputs).length ? (
        <details class="spec-inputs">
          <summary>Input expressions</summary>
          <Json value={spec.inputs} />
        </details>
      ) : null}
      <h3>Logs</h3>
      <StepLogs key={`${stepId}#${epoch}`} runId={store.run?.runId ?? ""} stepId={stepId} follow={!runEnded} />
    </aside>
  );
}

// ---- map items ----

const ROW_H = 26;
const VIEW_H = 312;

const ITEM_FILTERS: [string, string, (s: StepState) => boolean][] = [
  ["", "all", () => true],
  ["RUNNING", "running", (s) => s === StepState.RUNNING || s === StepState.ASSIGNED],
  ["FAILED", "failed", (s) => s === StepState.FAILED],
  ["RETRY_WAIT", "retrying", (s) => s === StepState.RETRY_WAIT],
  ["PENDING", "waiting", (s) => s === StepState.PENDING || s === StepState.READY],
  ["SUCCEEDED", "succeeded", (s) => s === StepState.SUCCEEDED],
  ["CANCELLED", "cancelled", (s) => s === StepState.CANCELLED],
  ["SKIPPED", "skipped", (s) => s === StepState.SKIPPED],
];

function MapItems({ store, mapId, onSelect, now }: { store: RunStore; mapId: string; onSelect: (id: string) => void; now: number }) {
  const [filter, setFilter] = useState("");
  const [top, setTop] = useState(0);
  const version = store.version;
  const items = useMemo(() => {
    const test = ITEM_FILTERS.find(([v]) => v === filter)?.[2] ?? (() => true);
    return store.itemsOf(mapId).filter((s) => test(s.state));
  }, [version, filter, mapId]);
  const total = store.steps.get(mapId)?.itemCount ?? items.length;
  const first = Math.max(0, Math.floor(top / ROW_H) - 6);
  const last = Math.min(items.length, first + Math.ceil(VIEW_H / ROW_H) + 12);

  return (
    <div class="items" data-testid="map-items">
      <div class="items-head">
        <h3>Items</h3>
        <select data-testid="map-items-filter" value={filter} onChange={(e) => setFilter(e.currentTarget.value)}>
          {ITEM_FILTERS.map(([v, label]) => (
            <option value={v} key={v}>
              {label}
            </option>
          ))}
        </select>
        <span class="muted small">
          {fmtInt(items.length)} shown of {fmtInt(total)}
        </span>
      </div>
      <div class="items-scroll" style={{ height: `${Math.min(VIEW_H, Math.max(1, items.length) * ROW_H + 2)}px` }} onScroll={(e) => setTop(e.currentTarget.scrollTop)}>
        <div style={{ height: `${items.length * ROW_H}px`, position: "relative" }}>
          {items.slice(first, last).map((item, i) => (
            <ItemRow key={item.stepId} item={item} top={(first + i) * ROW_H} now={now} onSelect={onSelect} />
          ))}
        </div>
      </div>
    </div>
  );
}

function ItemRow({ item, top, now, onSelect }: { item: Step; top: number; now: number; onSelect: (id: string) => void }) {
  const st = stepStateName(item.state);
  const started = tsMs(item.startedAt);
  return (
    <div
      class="item-row"
      style={{ top: `${top}px` }}
      data-testid="map-item"
      data-step-id={item.stepId}
      data-state={st}
      onClick={() => onSelect(item.stepId)}
    >
      <span class="mono idx">{item.itemIndex}</span>
      <StateBadge state={st} />
      <span class="muted">#{item.attempt || "–"}</span>
      <span class="dur">{started !== undefined ? fmtDuration((tsMs(item.finishedAt) ?? now) - started) : ""}</span>
      <span class="mono muted" title={item.worker}>
        {item.worker ? shortId(item.worker) : ""}
      </span>
      <span class={item.error ? "err" : "muted"} title={item.error || item.progressMessage}>
        {item.error
          ? truncate(item.error, 80)
          : item.state === StepState.RUNNING
            ? `${Math.round(item.progress * 100)}% ${item.progressMessage}`
            : item.childRunId
              ? "child run"
              : ""}
      </span>
    </div>
  );
}

// ---- logs ----

interface LogRow {
  key: string;
  at?: number;
  stepId: string;
  attempt: number;
  level: string;
  text: string;
}

const MAX_LINES = 5000;

/** GetStepLogs, following while the run goes on; resumes after a break from the last seq. */
function StepLogs({ runId, stepId, follow }: { runId: string; stepId: string; follow: boolean }) {
  const [lines, setLines] = useState<LogRow[]>([]);
  const [error, setError] = useState<CallError | null>(null);
  const [state, setState] = useState<"loading" | "following" | "done">("loading");
  const box = useRef<HTMLDivElement>(null);
  const stick = useRef(true);

  useEffect(() => {
    if (!runId) return;
    const ctl = new AbortController();
    let afterSeq = 0n;
    let buffer: LogRow[] = [];
    let timer: ReturnType<typeof setTimeout> | undefined;
    let n = 0;
    // Lines arrive in bursts: append them in batches, a few times a second.
    const flush = () => {
      timer = undefined;
      const batch = buffer;
      buffer = [];
      setLines((old) => {
        const all = old.concat(batch);
        return all.length > MAX_LINES ? all.slice(-MAX_LINES) : all;
      });
    };
    (async () => {
      let failures = 0;
      while (!ctl.signal.aborted) {
        try {
          const stream = runClient.getStepLogs({ runId, stepId, follow, afterSeq }, { signal: ctl.signal });
          setState(follow ? "following" : "loading");
          for await (const res of stream) {
            failures = 0;
            afterSeq = res.seq;
            for (const line of res.lines) {
              buffer.push({
                key: String(n++),
                at: tsMs(line.at),
                stepId: res.stepId,
                attempt: res.attempt,
                level: line.level,
                text: line.text,
              });
            }
            if (!timer) timer = setTimeout(flush, 120);
          }
          if (timer) clearTimeout(timer);
          flush();
          setState("done");
          setError(null);
          return;
        } catch (err) {
          if (ctl.signal.aborted) return;
          const e = describeError("RunService.GetStepLogs", err);
          setError(e);
          if (!isTransient(e.code) || ++failures > 5) {
            setState("done");
            return;
          }
          await sleep(1000, ctl.signal);
        }
      }
    })();
    return () => {
      ctl.abort();
      clearTimeout(timer);
    };
  }, [runId, stepId, follow]);

  useEffect(() => {
    const el = box.current;
    if (el && stick.current) el.scrollTop = el.scrollHeight;
  }, [lines]);

  return (
    <div>
      <ErrorBanner error={error} />
      <div
        class="logs"
        data-testid="step-logs"
        data-state={state}
        ref={box}
        onScroll={(e) => {
          const el = e.currentTarget;
          stick.current = el.scrollTop + el.clientHeight >= el.scrollHeight - 8;
        }}
      >
        {lines.length === 0 ? (
          <span class="muted">{state === "done" ? "No log lines." : state === "following" ? "Waiting for log lines…" : "Loading…"}</span>
        ) : (
          lines.map((l) => (
            <div class={`log-line lv-${l.level}`} key={l.key} data-testid="log-line">
              <span class="ts" title={l.at !== undefined ? absTime(l.at) : ""}>
                {l.at !== undefined ? new Date(l.at).toISOString().slice(11, 23) : ""}
              </span>
              {l.stepId !== "" ? <span class="src">{l.stepId}#{l.attempt}</span> : null}
              <span class="lvl">{l.level}</span>
              <span class="txt">{l.text}</span>
            </div>
          ))
        )}
      </div>
      {lines.length >= MAX_LINES ? <p class="muted small">Only the last {fmtInt(MAX_LINES)} lines are kept.</p> : null}
    </div>
  );
}
