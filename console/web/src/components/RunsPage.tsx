// The runs list: ListRuns every second with the filters of the hash query.
import { useEffect, useState } from "preact/hooks";
import { type CallError, describeError, runClient, UNARY } from "../api";
import { fmtInt, parseTags, RUN_STATES, runStateFromName, runStateName, tsMs } from "../format";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { Run } from "../gen/dagmesh/v1/types_pb";
import { href, replaceQuery, type Route } from "../router";
import { Elapsed, ErrorBanner, StateBadge, Tags, TimeAgo } from "./common";

const POLL_MS = 1000;
const PAGE = 100;
const MAX_PAGE = 1000; // the server's own limit for page_size

/** `since` values of the created-after filter (ListRunsRequest.created_after, from now). */
const SINCE: [string, string, number][] = [
  ["", "any time", 0],
  ["15m", "last 15 min", 15 * 60e3],
  ["1h", "last hour", 3600e3],
  ["6h", "last 6 hours", 6 * 3600e3],
  ["24h", "last 24 hours", 86400e3],
  ["7d", "last 7 days", 7 * 86400e3],
];

/** A text input that edits a query parameter, written to the hash once typing pauses. */
function useDebouncedParam(value: string, key: string): [string, (v: string) => void] {
  const [text, setText] = useState(value);
  useEffect(() => setText(value), [value]);
  useEffect(() => {
    if (text === value) return;
    const timer = setTimeout(() => replaceQuery({ [key]: text.trim() }), 300);
    return () => clearTimeout(timer);
  }, [text]);
  return [text, setText];
}

export function RunsPage({ route }: { route: Route }) {
  const q = route.query;
  const workflow = q.get("workflow") ?? "";
  const state = q.get("state") ?? "";
  const tag = q.get("tag") ?? "";
  const since = q.get("since") ?? "";
  const limit = Math.min(MAX_PAGE, Math.max(PAGE, Number(q.get("limit")) || PAGE));

  const [workflowText, setWorkflowText] = useDebouncedParam(workflow, "workflow");
  const [tagText, setTagText] = useDebouncedParam(tag, "tag");
  const [runs, setRuns] = useState<Run[] | null>(null);
  const [more, setMore] = useState(false);
  const [error, setError] = useState<CallError | null>(null);
  const [now, setNow] = useState(Date.now());

  const tags = parseTags(tag);
  const sinceMs = SINCE.find(([v]) => v === since)?.[2] ?? 0;

  useEffect(() => {
    // The rows of the previous filters stay until the new answer replaces them (no flicker).
    const ctl = new AbortController();
    let timer: ReturnType<typeof setTimeout> | undefined;
    // Polled with a timer after each answer (not setInterval): one call at a time, 1 s apart.
    const tick = async () => {
      if (!document.hidden) {
        try {
          const res = await runClient.listRuns(
            {
              workflow,
              state: runStateFromName(state),
              tags: tags ?? {},
              pageSize: limit,
              createdAfter: sinceMs ? timestampFromMs(Date.now() - sinceMs) : undefined,
            },
            { ...UNARY, signal: ctl.signal },
          );
          if (ctl.signal.aborted) return;
          setRuns(res.runs);
          setMore(res.nextPageToken !== "");
          setError(null);
          setNow(Date.now());
        } catch (err) {
          if (ctl.signal.aborted) return;
          setError(describeError("RunService.ListRuns", err));
        }
      }
      if (!ctl.signal.aborted) timer = setTimeout(tick, POLL_MS);
    };
    if (tags === null) {
      setRuns([]);
    } else {
      void tick();
    }
    return () => {
      ctl.abort();
      clearTimeout(timer);
    };
  }, [workflow, state, tag, since, limit]);

  const shown = runs ?? [];

  return (
    <div class="page">
      <div class="page-head">
        <h1>Runs</h1>
        <span class="muted live" title="refreshed every second">
          ● live
        </span>
      </div>
      <form class="filters" onSubmit={(e) => e.preventDefault()}>
        <label>
          Workflow
          <input
            data-testid="filter-workflow"
            type="search"
            placeholder="any"
            value={workflowText}
            onInput={(e) => setWorkflowText(e.currentTarget.value)}
          />
        </label>
        <label>
          State
          <select data-testid="filter-state" value={state} onChange={(e) => replaceQuery({ state: e.currentTarget.value })}>
            <option value="">all</option>
            {RUN_STATES.map((s) => (
              <option value={s} key={s}>
                {s}
              </option>
            ))}
          </select>
        </label>
        <label>
          Tag
          <input
            data-testid="filter-tag"
            type="search"
            placeholder="key=value"
            value={tagText}
            class={tags === null ? "invalid" : ""}
            title="key=value, several separated by commas"
            onInput={(e) => setTagText(e.currentTarget.value)}
          />
        </label>
        <label>
          Created
          <select data-testid="filter-since" value={since} onChange={(e) => replaceQuery({ since: e.currentTarget.value })}>
            {SINCE.map(([v, label]) => (
              <option value={v} key={v}>
                {label}
              </option>
            ))}
          </select>
        </label>
        {workflow || state || tag || since ? (
          <a class="clear" href={href(["runs"])} data-testid="filter-clear">
            clear filters
          </a>
        ) : null}
      </form>
      {tags === null ? <div class="hint">A tag filter is key=value (several separated by commas).</div> : null}
      <ErrorBanner error={error} />
      {runs === null && !error ? <p class="muted">Loading…</p> : null}
      {runs !== null ? (
        <table class="grid runs" data-testid="runs">
          <thead>
            <tr>
              <th>Run</th>
              <th>Workflow</th>
              <th>State</th>
              <th>Created</th>
              <th>Ended</th>
              <th>Duration</th>
              <th>Tags</th>
            </tr>
          </thead>
          <tbody>
            {shown.map((run) => (
              <RunRow run={run} now={now} key={run.runId} />
            ))}
          </tbody>
        </table>
      ) : null}
      {runs !== null && shown.length === 0 ? (
        <p class="empty" data-testid="runs-empty">
          No runs{workflow || state || tag || since ? " match these filters" : " yet"}.
        </p>
      ) : null}
      <p class="muted small">
        {fmtInt(shown.length)} run{shown.length === 1 ? "" : "s"} shown, newest first.{" "}
        {more && limit < MAX_PAGE ? (
          <a href={href(["runs"], { ...Object.fromEntries(q), limit: String(Math.min(MAX_PAGE, limit + PAGE * 2)) })}>
            show more
          </a>
        ) : null}
      </p>
    </div>
  );
}

function RunRow({ run, now }: { run: Run; now: number }) {
  const st = runStateName(run.state);
  const created = tsMs(run.createdAt);
  const ended = tsMs(run.finishedAt);
  return (
    <tr data-testid="run-row" data-run-id={run.runId} data-state={st}>
      <td>
        <a href={href(["runs", run.runId])} class="mono" title={run.runId}>
          {run.runId}
        </a>
        {run.parentRunId ? (
          <span class="muted small" title={`child of ${run.parentRunId} (step ${run.parentStepId})`}>
            {" "}
            ↳ child
          </span>
        ) : null}
      </td>
      <td class="nowrap">
        <a href={href(["workflows", run.workflow])}>{run.workflow}</a>
        <span class="muted">@{run.workflowVersion}</span>
      </td>
      <td class="nowrap">
        <StateBadge state={st} />
        {run.suspended ? <StateBadge state="SUSPENDED" label="suspended" /> : null}
        {run.queuePosition ? <span class="muted small"> #{fmtInt(run.queuePosition)} in queue</span> : null}
      </td>
      <td class="nowrap">
        <TimeAgo ms={created} now={now} />
      </td>
      <td class="nowrap">
        <TimeAgo ms={ended} now={now} />
      </td>
      <td class="num nowrap">
        <Elapsed from={created} to={ended} now={now} />
      </td>
      <td>
        <Tags tags={run.tags} onPick={(t) => replaceQuery({ tag: t })} />
      </td>
    </tr>
  );
}
