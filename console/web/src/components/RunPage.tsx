// One run, live: WatchRun feeds a RunStore; the page draws its header, actions, DAG, timeline
// and the selected step.
import { useEffect, useMemo, useState } from "preact/hooks";
import { type CallError, describeError, getWorkflow, isTransient, runClient, sleep, UNARY } from "../api";
import { type GraphNode, graphKey, layoutGraph, specGraph } from "../dag";
import { fmtInt, runEnded, runStateName, shortId, stepStateName, truncate, tsMs } from "../format";
import { RunState, type Step, StepState, type StepSpec, type Workflow } from "../gen/dagmesh/v1/types_pb";
import { href, navigate, replaceQuery, type Route } from "../router";
import { RunStore } from "../runstore";
import { Elapsed, ErrorBanner, Json, Notice, RunLink, StateBadge, Tags, TimeAgo, useNow } from "./common";
import { DagView, type NodeView } from "./DagView";
import { StepPanel } from "./StepPanel";
import { Timeline } from "./Timeline";

/** Subscribes to the store's flushes. */
function useStoreVersion(store: RunStore): number {
  const [version, setVersion] = useState(store.version);
  useEffect(() => {
    setVersion(store.version);
    return store.subscribe(() => setVersion(store.version));
  }, [store]);
  return version;
}

/**
 * WatchRun with resumption: after a break it reconnects in 1 s with `after_seq` = the last
 * event seen (no snapshot, no gap). After three failures in a row it also reads the run with
 * GetRun each round, so the page stays current while the stream cannot be held.
 */
function useWatch(store: RunStore, runId: string, epoch: number, setError: (e: CallError | null, note?: string) => void) {
  useEffect(() => {
    const ctl = new AbortController();
    const signal = ctl.signal;
    (async () => {
      let failures = 0;
      while (!signal.aborted) {
        try {
          const resume = store.run !== undefined;
          const stream = runClient.watchRun(resume ? { runId, afterSeq: store.lastSeq } : { runId }, { signal });
          for await (const res of stream) {
            if (failures) setError(null);
            failures = 0;
            if (res.message.case === "snapshot") {
              // Marks when the run's first snapshot has arrived and been decoded (see DagView's
              // mark): the browser test tells the server's part from the page's.
              if (performance.getEntriesByName("dagmesh:snapshot").length === 0) performance.mark("dagmesh:snapshot");
              store.applySnapshot(res.message.value);
            } else if (res.message.case === "event") {
              store.applyEvent(res.message.value);
            }
          }
          // The server closes the stream after the run's final event.
          if (store.ended()) {
            setError(null);
            return;
          }
        } catch (err) {
          if (signal.aborted) return;
          const e = describeError("RunService.WatchRun", err);
          if (!isTransient(e.code)) {
            setError(e);
            return; // NOT_FOUND, UNAUTHENTICATED...: retrying changes nothing
          }
          failures++;
          if (failures >= 2) setError(e, `reconnecting${failures >= 3 ? "; reading the run every 2 s meanwhile" : ""}`);
        }
        if (failures >= 3) {
          try {
            store.applySnapshot(await runClient.getRun({ runId }, { ...UNARY, signal }));
            if (store.ended()) return;
          } catch (err) {
            if (signal.aborted) return;
            setError(describeError("RunService.GetRun", err), "the live stream is down too");
          }
        }
        await sleep(failures >= 3 ? 2000 : 1000, signal);
      }
    })();
    return () => ctl.abort();
  }, [store, runId, epoch]);
}

/** Workflow versions are immutable: fetched once per name@version. */
function useWorkflowVersion(name: string | undefined, version: number | undefined) {
  const [wf, setWf] = useState<Workflow | undefined>(undefined);
  const [error, setError] = useState<CallError | null>(null);
  useEffect(() => {
    if (!name) return;
    let live = true;
    getWorkflow(name, version ?? 0).then(
      (w) => live && (setWf(w), setError(null)),
      (err) => live && setError(describeError("WorkflowService.GetWorkflow", err)),
    );
    return () => {
      live = false;
    };
  }, [name, version]);
  return [wf, error] as const;
}

const SYMBOLS: [string, (s: StepState) => boolean][] = [
  ["✓", (s) => s === StepState.SUCCEEDED],
  ["▶", (s) => s === StepState.RUNNING || s === StepState.ASSIGNED],
  ["↻", (s) => s === StepState.RETRY_WAIT],
  ["✗", (s) => s === StepState.FAILED],
  ["⊘", (s) => s === StepState.CANCELLED],
  ["⤼", (s) => s === StepState.SKIPPED],
  ["○", (s) => s === StepState.PENDING || s === StepState.READY],
];

/** "9,812 ✓ 150 ▶ 38 ✗" and the fraction of items that ended. */
function itemCounts(items: Step[], total: number): { text: string; done: number; title: string } {
  const counts = SYMBOLS.map(() => 0);
  for (const item of items) {
    const i = SYMBOLS.findIndex(([, test]) => test(item.state));
    if (i >= 0) counts[i]++;
  }
  const ended = counts[0] + counts[3] + counts[4] + counts[5];
  const parts = SYMBOLS.map(([sym], i) => (counts[i] ? `${fmtInt(counts[i])} ${sym}` : "")).filter(Boolean);
  const unknown = Math.max(0, total - items.length);
  if (unknown) parts.push(`${fmtInt(unknown)} ○`);
  const names = ["succeeded", "running", "retrying", "failed", "cancelled", "skipped", "waiting"];
  const title = names.map((n, i) => `${n}: ${fmtInt(counts[i] + (i === 6 ? unknown : 0))}`).join("\n");
  return { text: parts.join(" ") || "no items yet", done: total ? ended / total : 0, title };
}

function isWaitingForApproval(step: Step | undefined, spec: StepSpec | undefined): boolean {
  if (!step || step.state !== StepState.RUNNING) return false;
  return step.waitingFor.startsWith("approval") || (spec?.approval !== undefined && !step.mapStep);
}

export function RunPage({ runId, route }: { runId: string; route: Route }) {
  const store = useMemo(() => new RunStore(), [runId]);
  const [epoch, setEpoch] = useState(0);
  const [watchError, setWatchErrorState] = useState<{ e: CallError; note?: string } | null>(null);
  const setWatchError = (e: CallError | null, note?: string) => setWatchErrorState(e ? { e, note } : null);
  const version = useStoreVersion(store);
  useWatch(store, runId, epoch, setWatchError);
  const now = useNow(1000);
  const run = store.run;
  const [wf, wfError] = useWorkflowVersion(run?.workflow, run?.workflowVersion);

  const [busy, setBusy] = useState(false);
  const [notice, setNotice] = useState<string | null>(null);
  const [actionError, setActionError] = useState<CallError | null>(null);
  const [cancelOpen, setCancelOpen] = useState(false);
  const [cancelReason, setCancelReason] = useState("");
  const [memoized, setMemoized] = useState(false);
  const [comment, setComment] = useState("");

  const selected = route.query.get("step") ?? "";

  // The spec of every step id, hooks included.
  const specs = useMemo(() => {
    const map = new Map<string, { spec: StepSpec; hook: boolean }>();
    if (wf?.spec) {
      for (const s of wf.spec.steps) map.set(s.id, { spec: s, hook: false });
      for (const s of [...wf.spec.onExit, ...wf.spec.onSuccess, ...wf.spec.onFailure]) map.set(s.id, { spec: s, hook: true });
    }
    return map;
  }, [wf]);

  // Laid out again only when the node set changes (store.structure), never on state changes.
  const graph = useMemo(() => {
    const extra: GraphNode[] = store.order
      .filter((id) => !specs.has(id))
      .map((id) => {
        const s = store.steps.get(id)!;
        return { id, detail: s.task, isMap: s.itemCount > 0 || store.items.has(id), isApproval: false };
      });
    return specGraph(wf?.spec, extra);
  }, [store.structure, wf, specs]);
  const key = graphKey(graph);
  const layout = useMemo(() => layoutGraph(graph), [key]);

  const views = useMemo(() => {
    const out = new Map<string, NodeView>();
    for (const node of graph.nodes) {
      const step = store.steps.get(node.id);
      const spec = specs.get(node.id)?.spec;
      if (!step) {
        out.set(node.id, { state: "PENDING", progress: 0, line: "not started" });
        continue;
      }
      const st = stepStateName(step.state);
      const approval = isWaitingForApproval(step, spec);
      if (node.isMap) {
        const c = itemCounts(store.itemsOf(node.id), step.itemCount);
        out.set(node.id, {
          state: st,
          attempt: step.attempt > 1 ? step.attempt : undefined,
          line: c.text,
          progress: step.state === StepState.SUCCEEDED ? 1 : c.done,
          progressMessage: step.itemCount ? `${fmtInt(Math.round(c.done * step.itemCount))} of ${fmtInt(step.itemCount)} items ended` : "",
          title: `${node.id} (${st})\n${fmtInt(step.itemCount)} items\n${c.title}`,
        });
        continue;
      }
      let line = "";
      if (step.waitingReason) line = step.waitingReason;
      else if (step.waitingFor) line = step.waitingFor;
      else if (step.state === StepState.FAILED && step.error) line = step.error;
      else if (step.cachedFrom) line = `cached from ${shortId(step.cachedFrom)}`;
      else if (step.worker) line = `on ${shortId(step.worker, 14)}`;
      out.set(node.id, {
        state: st,
        cls: approval ? "approval" : undefined,
        attempt: step.attempt || undefined,
        line,
        progress: step.state === StepState.SUCCEEDED ? 1 : step.progress,
        progressMessage: step.progressMessage,
        title: [
          `${node.id} (${st}${approval ? ", waiting for approval" : ""})`,
          node.detail,
          step.attempt ? `attempt ${step.attempt}` : "",
          step.worker ? `worker ${step.worker}` : "",
          step.error,
        ]
          .filter(Boolean)
          .join("\n"),
      });
    }
    return out;
  }, [version, graph, specs]);

  const select = (id: string) => replaceQuery({ step: id === selected ? null : id });

  // Details events do not carry (outputs, child run ids...): read with GetRun when the open
  // step changed since the snapshot, and every few seconds for small runs.
  const [detailError, setDetailError] = useState<CallError | null>(null);
  const selStep = selected ? store.steps.get(selected) : undefined;
  const selKey = selStep ? `${selected}:${selStep.state}:${selStep.attempt}` : "";
  useEffect(() => {
    const ctl = new AbortController();
    const refresh = async () => {
      try {
        store.mergeDetails(await runClient.getRun({ runId }, { ...UNARY, signal: ctl.signal }));
        setDetailError(null);
      } catch (err) {
        if (!ctl.signal.aborted) setDetailError(describeError("RunService.GetRun", err));
      }
    };
    const once = setTimeout(() => selKey && store.stale.has(selected) && refresh(), 250);
    const every = setInterval(() => {
      if (store.stale.size && store.steps.size <= 2000 && !document.hidden) void refresh();
    }, 3000);
    return () => {
      ctl.abort();
      clearTimeout(once);
      clearInterval(every);
    };
  }, [store, runId, selKey]);

  if (!run) {
    return (
      <div class="page">
        <div class="page-head">
          <h1>
            Run <span class="mono">{runId}</span>
          </h1>
        </div>
        <ErrorBanner error={watchError?.e} note={watchError?.note} />
        {!watchError ? <p class="muted">Loading…</p> : null}
      </div>
    );
  }

  const st = runStateName(run.state);
  const ended = runEnded(run.state);
  const created = tsMs(run.createdAt);
  const finished = tsMs(run.finishedAt);

  async function act(call: string, what: () => Promise<unknown>, done: string) {
    setBusy(true);
    setActionError(null);
    setNotice(null);
    try {
      await what();
      setNotice(done);
      setEpoch((e) => e + 1); // resume the watch: a retried run has new events after its end
    } catch (err) {
      setActionError(describeError(call, err));
    } finally {
      setBusy(false);
    }
  }

  const cancel = () =>
    act("RunService.CancelRun", () => runClient.cancelRun({ runId, reason: cancelReason }, UNARY), "Cancel requested.").then(() =>
      setCancelOpen(false),
    );
  const retry = (fromStep = "") =>
    act(
      "RunService.RetryRun",
      () => runClient.retryRun({ runId, fromStep }, UNARY),
      fromStep ? `Retrying from step ${fromStep}.` : "Retrying the failed steps.",
    );
  const suspend = () => act("RunService.SuspendRun", () => runClient.suspendRun({ runId, reason: "from the console" }, UNARY), "Run suspended.");
  const resume = () => act("RunService.ResumeRun", () => runClient.resumeRun({ runId }, UNARY), "Run resumed.");
  const approve = (stepId: string, yes: boolean) =>
    act(
      "RunService.ApproveStep",
      () => runClient.approveStep({ runId, stepId, approve: yes, comment }, UNARY),
      `Step ${stepId} ${yes ? "approved" : "denied"}.`,
    ).then(() => setComment(""));
  const resubmit = async () => {
    setBusy(true);
    setActionError(null);
    try {
      const res = await runClient.submitRun(
        {
          workflowRef: { case: "workflow", value: { name: run.workflow, version: run.workflowVersion } },
          inputs: run.inputs,
          tags: run.tags,
          priority: run.priority,
          notifications: run.notifications,
          memoizeFrom: memoized ? run.runId : "",
        },
        UNARY,
      );
      if (res.run) navigate(["runs", res.run.runId]);
    } catch (err) {
      setActionError(describeError("RunService.SubmitRun", err));
    } finally {
      setBusy(false);
    }
  };

  const approvals = store.order.filter((id) => isWaitingForApproval(store.steps.get(id), specs.get(id)?.spec));
  const children = collectChildren(store, 12);
  const selectedStep = selected ? store.steps.get(selected) : undefined;
  const selectedSpec = selected ? specs.get(selectedStep?.mapStep || selected) : undefined;
  const selectedKnown = selected && (selectedStep || specs.has(selected) || graph.nodes.some((n) => n.id === selected));

  return (
    <div class="page run-page" data-testid="run-page" data-run-id={run.runId}>
      <div class="page-head">
        <h1>
          Run <span class="mono">{run.runId}</span>
        </h1>
        <StateBadge state={st} testid="run-state" />
        {run.suspended ? <StateBadge state="SUSPENDED" label="suspended" testid="run-suspended" /> : null}
        {run.state === RunState.QUEUED && run.queuePosition ? <span class="muted"> #{fmtInt(run.queuePosition)} in the admission queue</span> : null}
        {!ended ? (
          <span class="muted live" title="WatchRun stream">
            ● live
          </span>
        ) : null}
      </div>

      <ErrorBanner error={watchError?.e} note={watchError?.note} />
      <ErrorBanner error={wfError} note="the graph shows the run's steps without their edges" />
      <ErrorBanner error={actionError} />
      <ErrorBanner error={detailError} note="step details may be out of date" />
      <Notice text={notice} onClose={() => setNotice(null)} />

      <section class="card run-head">
        <dl class="facts wide">
          <dt>Workflow</dt>
          <dd>
            <a href={href(["workflows", run.workflow], { version: String(run.workflowVersion) })} data-testid="run-workflow">
              {run.workflow}
            </a>
            <span class="muted">@{run.workflowVersion}</span>
          </dd>
          <dt>Created</dt>
          <dd>
            <TimeAgo ms={created} now={now} />
            {run.submittedBy ? <span class="muted"> by {run.submittedBy}</span> : null}
          </dd>
          <dt>Ended</dt>
          <dd>
            <TimeAgo ms={finished} now={now} />
            {run.cancelledBy ? <span class="muted"> cancelled by {run.cancelledBy}</span> : null}
          </dd>
          <dt>Duration</dt>
          <dd>
            <Elapsed from={created} to={finished} now={now} />
          </dd>
          {run.retriedBy ? (
            <>
              <dt>Retried by</dt>
              <dd>{run.retriedBy}</dd>
            </>
          ) : null}
          {run.parentRunId ? (
            <>
              <dt>Parent</dt>
              <dd data-testid="parent-run">
                <RunLink id={run.parentRunId} /> <span class="muted">step {run.parentStepId}</span>
              </dd>
            </>
          ) : null}
          {children.ids.length ? (
            <>
              <dt>Child runs</dt>
              <dd data-testid="child-runs">
                {children.ids.map(([step, id]) => (
                  <span key={id} class="child">
                    <RunLink id={id} short /> <span class="muted">({step})</span>{" "}
                  </span>
                ))}
                {children.more ? <span class="muted">and {fmtInt(children.more)} more (see the map items)</span> : null}
              </dd>
            </>
          ) : null}
          {Object.keys(run.tags).length ? (
            <>
              <dt>Tags</dt>
              <dd>
                <Tags tags={run.tags} onPick={(t) => navigate(["runs"], { tag: t })} />
              </dd>
            </>
          ) : null}
          {run.idempotencyKey ? (
            <>
              <dt>Idempotency key</dt>
              <dd class="mono">{run.idempotencyKey}</dd>
            </>
          ) : null}
        </dl>
        {run.error ? (
          <div class="run-error" data-testid="run-error">
            <pre>{run.error}</pre>
          </div>
        ) : null}
        <details class="run-inputs">
          <summary>Inputs</summary>
          <Json value={run.inputs ?? {}} testid="run-inputs" />
        </details>

        <div class="actions" data-testid="actions">
          {!ended && !cancelOpen ? (
            <button type="button" class="danger" data-testid="action-cancel" disabled={busy} onClick={() => setCancelOpen(true)}>
              Cancel run…
            </button>
          ) : null}
          {!ended && cancelOpen ? (
            <span class="confirm">
              <input
                data-testid="cancel-reason"
                placeholder="reason (optional)"
                value={cancelReason}
                onInput={(e) => setCancelReason(e.currentTarget.value)}
              />
              <button type="button" class="danger" data-testid="action-cancel-confirm" disabled={busy} onClick={cancel}>
                Cancel the run
              </button>
              <button type="button" data-testid="action-cancel-abort" onClick={() => setCancelOpen(false)}>
                Keep it
              </button>
            </span>
          ) : null}
          {run.state === RunState.RUNNING && !run.suspended ? (
            <button type="button" data-testid="action-suspend" disabled={busy} onClick={suspend} title="hand no more of its tasks to workers">
              Suspend
            </button>
          ) : null}
          {run.suspended && !ended ? (
            <button type="button" data-testid="action-resume" disabled={busy} onClick={resume}>
              Resume
            </button>
          ) : null}
          {run.state === RunState.FAILED || run.state === RunState.CANCELLED ? (
            <button type="button" data-testid="action-retry" disabled={busy} onClick={() => retry()} title="re-run the failed, cancelled and skipped steps">
              Retry
            </button>
          ) : null}
          {ended ? (
            <span class="resubmit">
              <button type="button" data-testid="action-resubmit" disabled={busy} onClick={resubmit} title="a new run with the same workflow version, inputs and tags">
                Resubmit
              </button>
              <label class="small" title="steps whose id, task and inputs match a step that succeeded here reuse its outputs">
                <input type="checkbox" data-testid="resubmit-memoized" checked={memoized} onChange={(e) => setMemoized(e.currentTarget.checked)} /> reuse
                what succeeded
              </label>
            </span>
          ) : null}
        </div>

        {approvals.length ? (
          <div class="approvals" data-testid="approvals">
            {approvals.map((id) => {
              const step = store.steps.get(id)!;
              return (
                <div class="approval" key={id} data-step-id={id}>
                  <span>
                    <strong>{id}</strong> waits for approval
                    {step.waitingFor ? <span class="muted">: {step.waitingFor.replace(/^approval:\s*/, "")}</span> : null}
                  </span>
                  <input data-testid="approve-comment" placeholder="comment (optional)" value={comment} onInput={(e) => setComment(e.currentTarget.value)} />
                  <button type="button" class="ok" data-testid="action-approve" data-step-id={id} disabled={busy} onClick={() => approve(id, true)}>
                    Approve
                  </button>
                  <button type="button" class="danger" data-testid="action-deny" data-step-id={id} disabled={busy} onClick={() => approve(id, false)}>
                    Deny
                  </button>
                </div>
              );
            })}
          </div>
        ) : null}
      </section>

      <div class={selectedKnown ? "run-body with-panel" : "run-body"}>
        <section class="card graph-card">
          <div class="card-head">
            <h2>Graph</h2>
            <span class="muted small">click a step for its details{graph.nodes.some((n) => n.isMap) ? "; a map step lists its items" : ""}</span>
          </div>
          <DagView graph={graph} layout={layout} view={(id) => views.get(id)} selected={selectedStep?.mapStep || selected} onSelect={select} />
        </section>
        {selectedKnown ? (
          <StepPanel
            store={store}
            stepId={selected}
            spec={selectedSpec?.spec}
            isHook={selectedSpec?.hook ?? false}
            runEnded={ended}
            now={now}
            epoch={epoch}
            onSelect={(id) => replaceQuery({ step: id })}
            onClose={() => replaceQuery({ step: null })}
            onRetryFrom={(id) => retry(id)}
            busy={busy}
          />
        ) : null}
      </div>

      <section class="card">
        <div class="card-head">
          <h2>Timeline</h2>
          <span class="muted small">one bar per attempt</span>
        </div>
        <Timeline store={store} now={now} onSelect={(id) => replaceQuery({ step: id })} />
      </section>

      <details class="card live-log">
        <summary>
          <h2>Live log</h2> <span class="muted small">the run's last log lines since this page opened</span>
        </summary>
        <div class="logs" data-testid="run-logs">
          {store.tail.length === 0 ? <span class="muted">No lines yet.</span> : null}
          {store.tail.map((l, i) => (
            <div class={`log-line lv-${l.level}`} key={`${l.seq}-${i}`}>
              <span class="src">
                {l.stepId}#{l.attempt}
              </span>
              <span class="lvl">{l.level}</span>
              <span class="txt">{truncate(l.text, 2000)}</span>
            </div>
          ))}
        </div>
      </details>
    </div>
  );
}

/** Child runs of workflow steps and their items, at most `max` of them. */
function collectChildren(store: RunStore, max: number): { ids: [string, string][]; more: number } {
  const ids: [string, string][] = [];
  let more = 0;
  for (const step of store.steps.values()) {
    if (!step.childRunId) continue;
    if (ids.length < max) ids.push([step.stepId, step.childRunId]);
    else more++;
  }
  return { ids, more };
}

