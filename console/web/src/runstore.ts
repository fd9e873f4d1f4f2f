// The live state of one run, fed by WatchRun (a snapshot, then events). Events are applied to
// plain objects as they arrive; subscribers are told at most every FLUSH_MS, in an animation
// frame, so a run with 10,000 map items reporting at once re-renders a few times a second, not
// once per event.
import { create } from "@bufbuild/protobuf";
import { stepEnded, tsMs } from "./format";
import {
  type Run,
  type RunEvent,
  RunState,
  type Step,
  StepSchema,
  StepState,
} from "./gen/dagmesh/v1/types_pb";

const FLUSH_MS = 150;
const LOG_TAIL = 300;

/** One attempt of a step as the timeline draws it. */
export interface AttemptSpan {
  attempt: number;
  start: number;
  end?: number;
  state?: StepState;
}

export interface TailLine {
  seq: bigint;
  at?: number;
  stepId: string;
  attempt: number;
  level: string;
  text: string;
}

const ITEM_ID = /^(.*)\[(\d+)\]$/;

export class RunStore {
  /** The run without its steps (those are in `steps`). */
  run: Run | undefined;
  /** Every step, map items included, by step id. */
  readonly steps = new Map<string, Step>();
  /** Step ids that are not map items, in the run's order (workflow steps, then hooks). */
  order: string[] = [];
  /** A map step's items, by index (holes until an item is known). */
  readonly items = new Map<string, Step[]>();
  /** Attempts seen so far per step (not per map item): the current one from the snapshot,
   *  later ones from events. Older attempts are not in the API's Step, so they are missing
   *  when the page was opened after they ended. */
  readonly attempts = new Map<string, AttemptSpan[]>();
  /** The last log lines of the run's StepLog events since the page was opened. */
  tail: TailLine[] = [];
  /** Steps whose state changed since the last snapshot: events do not carry inputs, outputs,
   *  child run ids or what a step waits for, so these need a GetRun to show them. */
  readonly stale = new Set<string>();
  lastSeq = 0n;
  /** Bumped when the set of (non-item) steps changes: the graph must be laid out again. */
  structure = 0;
  /** Bumped on every flush. */
  version = 0;

  private listeners = new Set<() => void>();
  private pending = false;
  private lastFlush = 0;

  subscribe(listener: () => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  ended(): boolean {
    const s = this.run?.state;
    return s === RunState.SUCCEEDED || s === RunState.FAILED || s === RunState.CANCELLED;
  }

  applySnapshot(run: Run): void {
    const steps = run.steps;
    this.run = { ...run, steps: [] };
    this.lastSeq = run.lastSeq;
    const before = this.order.join("\n");
    this.steps.clear();
    this.items.clear();
    this.stale.clear();
    this.order = [];
    for (const step of steps) this.addStep(step);
    for (const step of steps) {
      if (step.mapStep) continue;
      const start = tsMs(step.startedAt);
      if (start === undefined) continue; // a map step has attempt 0 but runs from its expansion
      // Keep attempts seen live before a reconnect; replace the current one.
      const spans = (this.attempts.get(step.stepId) ?? []).filter((s) => s.attempt < step.attempt);
      spans.push({ attempt: step.attempt, start, end: tsMs(step.finishedAt), state: step.state });
      this.attempts.set(step.stepId, spans);
    }
    if (this.order.join("\n") !== before) this.structure++;
    this.changed();
  }

  applyEvent(ev: RunEvent): void {
    if (ev.seq > this.lastSeq) this.lastSeq = ev.seq;
    const run = this.run;
    const at = tsMs(ev.at) ?? Date.now();
    switch (ev.event.case) {
      case "runState": {
        const e = ev.event.value;
        if (run) {
          run.state = e.state;
          run.error = e.error;
          run.suspended = e.suspended;
          if (e.state === RunState.SUCCEEDED || e.state === RunState.FAILED || e.state === RunState.CANCELLED) {
            run.finishedAt = ev.at;
          } else if (e.state === RunState.RUNNING) {
            run.finishedAt = undefined; // a retried run goes on
            run.queuePosition = 0;
          }
        }
        break;
      }
      case "stepState": {
        const e = ev.event.value;
        const step = this.steps.get(e.stepId) ?? this.newStep(e.stepId);
        const newAttempt = e.attempt !== step.attempt;
        this.stale.add(e.stepId);
        step.state = e.state;
        step.attempt = e.attempt;
        if (e.itemCount) step.itemCount = e.itemCount;
        if (e.cachedFrom) step.cachedFrom = e.cachedFrom;
        if (e.state === StepState.READY) {
          step.waitingReason = e.error;
        } else {
          step.waitingReason = "";
          if (e.error || stepEnded(e.state) || e.state === StepState.RETRY_WAIT) step.error = e.error;
        }
        if (e.worker) step.worker = e.worker;
        if (e.state === StepState.PENDING || e.state === StepState.READY) {
          // Waiting for (another) attempt: RetryRun and backoffs come back through here.
          step.startedAt = undefined;
          step.finishedAt = undefined;
          step.progress = 0;
          step.progressMessage = "";
        } else if (e.state === StepState.ASSIGNED) {
          if (newAttempt) {
            step.startedAt = undefined;
            step.finishedAt = undefined;
            step.progress = 0;
            step.progressMessage = "";
          }
        } else if (e.state === StepState.RUNNING) {
          // Like the server's started_at: when the worker (or the wait) started this attempt.
          if (newAttempt || !step.startedAt || step.finishedAt) {
            step.startedAt = ev.at;
            step.finishedAt = undefined;
          }
          if (newAttempt) {
            step.progress = 0;
            step.progressMessage = "";
          }
          if (!step.mapStep) this.spanStart(step.stepId, e.attempt, at);
        } else if (stepEnded(e.state) || e.state === StepState.RETRY_WAIT) {
          step.finishedAt = ev.at;
          step.waitingFor = "";
          if (!step.mapStep) this.spanEnd(step.stepId, e.attempt, at, e.state);
        }
        break;
      }
      case "stepProgress": {
        const e = ev.event.value;
        const step = this.steps.get(e.stepId);
        if (step && e.attempt >= step.attempt) {
          step.progress = e.fraction;
          step.progressMessage = e.message;
        }
        break;
      }
      case "stepLog": {
        const e = ev.event.value;
        for (const line of e.lines) {
          this.tail.push({
            seq: ev.seq,
            at: tsMs(line.at),
            stepId: e.stepId,
            attempt: e.attempt,
            level: line.level,
            text: line.text,
          });
        }
        if (this.tail.length > LOG_TAIL) this.tail = this.tail.slice(-LOG_TAIL);
        break;
      }
      default:
        break;
    }
    this.changed();
  }

  /**
   * Takes from a GetRun answer what events do not carry, for the stale steps; states stay as
   * the events left them (the stream may be ahead of the answer, or behind it: the next
   * events correct it either way).
   */
  mergeDetails(fresh: Run): void {
    for (const f of fresh.steps) {
      if (!this.stale.has(f.stepId)) continue;
      const step = this.steps.get(f.stepId);
      if (!step) continue;
      step.inputs = f.inputs;
      step.outputs = f.outputs;
      step.taskVersion = f.taskVersion;
      step.workerPrincipal = f.workerPrincipal;
      step.childRunId = f.childRunId;
      step.cacheKey = f.cacheKey;
      step.lostAttempts = f.lostAttempts;
      step.lostInARow = f.lostInARow;
      step.wakeAt = f.wakeAt;
      if (f.state === step.state && f.attempt === step.attempt) {
        step.waitingFor = f.waitingFor;
        step.error = f.error;
        this.stale.delete(f.stepId);
      }
    }
    if (this.run) {
      this.run.cancelledBy = fresh.cancelledBy;
      this.run.retriedBy = fresh.retriedBy;
    }
    this.changed();
  }

  /** The map step's items in index order (known ones only). */
  itemsOf(mapStep: string): Step[] {
    return (this.items.get(mapStep) ?? []).filter((s) => s !== undefined);
  }

  private addStep(step: Step): void {
    this.steps.set(step.stepId, step);
    if (step.mapStep) {
      let list = this.items.get(step.mapStep);
      if (!list) this.items.set(step.mapStep, (list = []));
      list[step.itemIndex] = step;
    } else {
      this.order.push(step.stepId);
    }
  }

  /** A step first seen in an event: a map item once its map expands (or a step of a run
   *  whose snapshot lacked it). */
  private newStep(stepId: string): Step {
    const m = ITEM_ID.exec(stepId);
    const parent = m ? this.steps.get(m[1]) : undefined;
    const step = create(StepSchema, {
      runId: this.run?.runId ?? "",
      stepId,
      taskId: `${this.run?.runId ?? ""}/${stepId}`,
      task: parent?.task ?? "",
      mapStep: m ? m[1] : "",
      itemIndex: m ? Number(m[2]) : 0,
    });
    this.addStep(step);
    if (!step.mapStep) this.structure++;
    return step;
  }

  private spanStart(stepId: string, attempt: number, at: number): void {
    const spans = this.attempts.get(stepId) ?? [];
    const last = spans[spans.length - 1];
    if (last && last.attempt === attempt) return;
    spans.push({ attempt, start: at });
    this.attempts.set(stepId, spans);
  }

  private spanEnd(stepId: string, attempt: number, at: number, state: StepState): void {
    const spans = this.attempts.get(stepId);
    const last = spans?.[spans.length - 1];
    if (last && last.attempt === attempt && last.end === undefined) {
      last.end = at;
      last.state = state;
    }
  }

  private changed(): void {
    if (this.pending) return;
    this.pending = true;
    const wait = Math.max(0, FLUSH_MS - (performance.now() - this.lastFlush));
    setTimeout(() => requestAnimationFrame(() => this.flush()), wait);
  }

  private flush(): void {
    this.pending = false;
    this.lastFlush = performance.now();
    this.version++;
    for (const listener of this.listeners) listener();
  }
}

