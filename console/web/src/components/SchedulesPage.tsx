// Schedules, triggers and backfills (SchedulerService), every 2 s. In a split deployment the
// server behind the console may serve no scheduler: UNIMPLEMENTED is said as such, not as an
// error.
import { useState } from "preact/hooks";
import { type CallError, Code, describeError, schedulerClient, UNARY } from "../api";
import { absTime, fmtInt, tsMs } from "../format";
import { type Backfill, BackfillState, CatchUp, Partition, type Schedule, type Trigger } from "../gen/dagmesh/v1/scheduler_pb";
import { href } from "../router";
import { Bar, ErrorBanner, RunLink, Section, Tags, TimeAgo, usePoll } from "./common";

const POLL_MS = 2000;

function enumName(e: Record<number, string>, value: number, prefix = ""): string {
  return (e[value] ?? String(value)).replace(prefix, "");
}

export function SchedulesPage() {
  const [schedules, setSchedules] = useState<Schedule[] | null>(null);
  const [triggers, setTriggers] = useState<Trigger[] | null>(null);
  const [backfills, setBackfills] = useState<Backfill[] | null>(null);
  const [errors, setErrors] = useState<CallError[]>([]);
  const [absent, setAbsent] = useState(false);
  const [now, setNow] = useState(Date.now());

  usePoll(
    async (signal) => {
      const opts = { ...UNARY, signal };
      const results = await Promise.allSettled([
        schedulerClient.listSchedules({}, opts),
        schedulerClient.listTriggers({}, opts),
        schedulerClient.listBackfills({}, opts),
      ]);
      if (signal.aborted) return;
      const [s, t, b] = results;
      if (s.status === "fulfilled") setSchedules(s.value.schedules);
      if (t.status === "fulfilled") setTriggers(t.value.triggers);
      if (b.status === "fulfilled") setBackfills(b.value.backfills);
      const names = ["SchedulerService.ListSchedules", "SchedulerService.ListTriggers", "SchedulerService.ListBackfills"];
      const errs = results.flatMap((r, i) => (r.status === "rejected" ? [describeError(names[i], r.reason)] : []));
      setAbsent(errs.length === 3 && errs.every((e) => e.code === Code.Unimplemented));
      setErrors(errs);
      setNow(Date.now());
    },
    POLL_MS,
    [],
  );

  if (absent) {
    return (
      <div class="page">
        <div class="page-head">
          <h1>Schedules</h1>
        </div>
        <p class="empty" data-testid="scheduler-absent">
          The scheduler is not served here: this server runs the executor alone (a split deployment). Cron schedules, triggers and
          backfills live on the scheduler's own server (<span class="mono">dagmesh schedules list --server …</span>).
        </p>
      </div>
    );
  }

  return (
    <div class="page">
      <div class="page-head">
        <h1>Schedules</h1>
        <span class="muted live" title="refreshed every 2 s">
          ● live
        </span>
      </div>
      {errors.map((e) => (
        <ErrorBanner key={e.call} error={e} />
      ))}
      <Section title="Cron schedules">
        {schedules === null ? null : schedules.length === 0 ? (
          <p class="empty">No schedules.</p>
        ) : (
          <table class="grid" data-testid="schedules">
            <thead>
              <tr>
                <th>Name</th>
                <th>Cron</th>
                <th>Workflow</th>
                <th>State</th>
                <th>Last tick</th>
                <th>Next tick</th>
                <th>Catch-up</th>
                <th>Tags</th>
                <th />
              </tr>
            </thead>
            <tbody>
              {schedules.map((s) => (
                <tr key={s.id} data-testid="schedule-row" data-name={s.name}>
                  <td>{s.name}</td>
                  <td class="mono">
                    {s.cron} <span class="muted">{s.timeZone || "UTC"}</span>
                  </td>
                  <td>
                    <a href={href(["workflows", s.workflow])}>{s.workflow}</a>
                    <span class="muted">@{s.workflowVersion || "latest"}</span>
                  </td>
                  <td>{s.paused ? <span class="badge st-CANCELLED">paused</span> : <span class="badge st-SUCCEEDED">active</span>}</td>
                  <td>
                    <TimeAgo ms={tsMs(s.lastTick)} now={now} />
                  </td>
                  <td>
                    <TimeAgo ms={tsMs(s.nextTick)} now={now} />
                  </td>
                  <td>
                    {enumName(CatchUp, s.catchUp)}
                    {s.catchUp === CatchUp.ALL ? <span class="muted"> (≤ {s.catchUpLimit || 100})</span> : null}
                  </td>
                  <td>
                    <Tags tags={s.tags} />
                  </td>
                  <td>
                    <a href={href(["runs"], { tag: `dagmesh.schedule=${s.name}` })}>runs</a>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        )}
      </Section>
      <Section title="Event triggers">
        {triggers === null ? null : triggers.length === 0 ? (
          <p class="empty">No triggers.</p>
        ) : (
          <table class="grid" data-testid="triggers">
            <thead>
              <tr>
                <th>Name</th>
                <th>Topic</th>
                <th>Workflow</th>
                <th>Filter</th>
                <th>Inputs</th>
                <th>Created</th>
                <th />
              </tr>
            </thead>
            <tbody>
              {triggers.map((t) => (
                <tr key={t.id} data-testid="trigger-row" data-name={t.name}>
                  <td>{t.name}</td>
                  <td class="mono">{t.topic}</td>
                  <td>
                    <a href={href(["workflows", t.workflow])}>{t.workflow}</a>
                    <span class="muted">@{t.workflowVersion || "latest"}</span>
                  </td>
                  <td class="mono small">{t.filter || <span class="muted">every event</span>}</td>
                  <td class="mono small">
                    {Object.keys(t.inputs).length ? (
                      Object.entries(t.inputs).map(([k, v]) => <div key={k}>{`${k}: ${v}`}</div>)
                    ) : (
                      <span class="muted">the payload</span>
                    )}
                  </td>
                  <td>
                    <TimeAgo ms={tsMs(t.createdAt)} now={now} />
                  </td>
                  <td>
                    <a href={href(["runs"], { tag: `dagmesh.trigger=${t.name}` })}>runs</a>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        )}
      </Section>
      <Section title="Backfills">
        {backfills === null ? null : backfills.length === 0 ? (
          <p class="empty">No backfills.</p>
        ) : (
          <table class="grid" data-testid="backfills">
            <thead>
              <tr>
                <th>Id</th>
                <th>Workflow</th>
                <th>Range</th>
                <th>State</th>
                <th>Progress</th>
                <th class="num">Running</th>
                <th class="num">Failed</th>
                <th class="num">Not started</th>
                <th />
              </tr>
            </thead>
            <tbody>
              {backfills.map((b) => {
                const st = enumName(BackfillState, b.state);
                const start = tsMs(b.start);
                const end = tsMs(b.end);
                const total = b.total || 1;
                return (
                  <tr key={b.id} data-testid="backfill-row" data-backfill-id={b.id} data-state={st}>
                    <td class="mono small" title={b.id}>
                      {b.id.slice(0, 8)}…
                    </td>
                    <td>
                      <a href={href(["workflows", b.workflow])}>{b.workflow}</a>
                      <span class="muted">@{b.workflowVersion || "latest"}</span>
                    </td>
                    <td class="small">
                      {start !== undefined ? absTime(start) : "?"} → {end !== undefined ? absTime(end) : "?"}
                      <div class="muted">
                        {enumName(Partition, b.partition).toLowerCase()} in {b.timeZone || "UTC"}, ≤ {fmtInt(b.maxConcurrency || 1)} at once
                      </div>
                    </td>
                    <td>
                      <span class={`badge st-${st}`}>{st}</span>
                      {b.error ? <div class="err small">{b.error}</div> : null}
                    </td>
                    <td>
                      <Bar
                        testid="backfill-progress"
                        parts={[
                          [b.done / total, "ok"],
                          [b.failed / total, "bad"],
                          [b.running / total, "busy"],
                        ]}
                        title={`${fmtInt(b.done)} succeeded, ${fmtInt(b.failed)} failed, ${fmtInt(b.running)} running, ${fmtInt(b.queued)} not started`}
                      />{" "}
                      {fmtInt(b.done)} / {fmtInt(b.total)}
                    </td>
                    <td class="num">{fmtInt(b.running)}</td>
                    <td class="num">{fmtInt(b.failed)}</td>
                    <td class="num">{fmtInt(b.queued)}</td>
                    <td>
                      <a href={href(["runs"], { tag: `dagmesh.backfill=${b.id}` })}>runs</a>
                      {b.activeRunIds.length ? (
                        <div class="small">
                          {b.activeRunIds.slice(0, 3).map((id) => (
                            <div key={id}>
                              <RunLink id={id} short />
                            </div>
                          ))}
                        </div>
                      ) : null}
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        )}
      </Section>
    </div>
  );
}
