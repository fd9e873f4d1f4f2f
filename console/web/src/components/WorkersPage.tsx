// Workers and ready queues (ClusterService), every 2 s.
import { useState } from "preact/hooks";
import { type CallError, clusterClient, describeError, UNARY } from "../api";
import { durationPbMs, fmtDuration, fmtInt, tsMs } from "../format";
import type { QueueInfo, WorkerInfo } from "../gen/dagmesh/v1/cluster_pb";
import { Bar, ErrorBanner, Section, Tags, TimeAgo, usePoll } from "./common";

const POLL_MS = 2000;

export function WorkersPage() {
  const [workers, setWorkers] = useState<WorkerInfo[] | null>(null);
  const [queues, setQueues] = useState<QueueInfo[] | null>(null);
  const [errors, setErrors] = useState<(CallError | null)[]>([null, null]);
  const [now, setNow] = useState(Date.now());

  usePoll(
    async (signal) => {
      const [w, q] = await Promise.allSettled([
        clusterClient.listWorkers({}, { ...UNARY, signal }),
        clusterClient.listQueues({}, { ...UNARY, signal }),
      ]);
      if (signal.aborted) return;
      if (w.status === "fulfilled") setWorkers(w.value.workers);
      if (q.status === "fulfilled") setQueues(q.value.queues);
      setErrors([
        w.status === "rejected" ? describeError("ClusterService.ListWorkers", w.reason) : null,
        q.status === "rejected" ? describeError("ClusterService.ListQueues", q.reason) : null,
      ]);
      setNow(Date.now());
    },
    POLL_MS,
    [],
  );

  // Instances grouped by worker name (a pool of identical processes shares one).
  const groups = new Map<string, WorkerInfo[]>();
  for (const w of workers ?? []) {
    const list = groups.get(w.workerName) ?? [];
    list.push(w);
    groups.set(w.workerName, list);
  }
  const names = [...groups.keys()].sort();

  return (
    <div class="page">
      <div class="page-head">
        <h1>Workers</h1>
        <span class="muted live" title="refreshed every 2 s">
          ● live
        </span>
      </div>
      <ErrorBanner error={errors[0]} />
      <ErrorBanner error={errors[1]} />
      <Section title="Workers">
        {workers === null && !errors[0] ? <p class="muted">Loading…</p> : null}
        {workers !== null && workers.length === 0 ? <p class="empty">No worker is connected.</p> : null}
        {workers !== null && workers.length > 0 ? (
          <table class="grid" data-testid="workers">
            <thead>
              <tr>
                <th>Worker / instance</th>
                <th>State</th>
                <th>SDK</th>
                <th>Task types</th>
                <th>Labels</th>
                <th>Slots in use</th>
                <th>Last seen</th>
              </tr>
            </thead>
            {names.map((name) => {
              const list = groups.get(name)!;
              const used = list.reduce((n, w) => n + w.usedSlots, 0);
              const total = list.reduce((n, w) => n + w.slots, 0);
              return (
                <tbody key={name} data-testid="worker-group" data-name={name}>
                  <tr class="group">
                    <th colSpan={5}>
                      {name || <span class="muted">(unnamed)</span>}{" "}
                      <span class="muted small">
                        {list.length} instance{list.length === 1 ? "" : "s"}
                      </span>
                    </th>
                    <th colSpan={2}>
                      <Bar parts={[[total ? used / total : 0, "busy"]]} title={`${used} of ${total} slots in use`} /> {fmtInt(used)} / {fmtInt(total)}
                    </th>
                  </tr>
                  {list.map((w) => (
                    <tr key={w.instanceId} data-testid="worker-row" data-instance-id={w.instanceId}>
                      <td class="mono small" title={w.instanceId}>
                        {w.instanceId}
                      </td>
                      <td>
                        {!w.connected ? (
                          <span class="badge st-RETRY_WAIT" title="the stream is broken; the lease still runs">
                            disconnected
                          </span>
                        ) : w.draining ? (
                          <span class="badge st-CANCELLED">draining</span>
                        ) : (
                          <span class="badge st-SUCCEEDED">connected</span>
                        )}
                      </td>
                      <td>
                        {w.sdkLanguage} <span class="muted">{w.sdkVersion}</span>
                      </td>
                      <td>
                        {w.taskTypes.map((t) => (
                          <span class="tag mono" key={`${t.name}@${t.version}`}>
                            {t.name}@{t.version}
                          </span>
                        ))}
                      </td>
                      <td>
                        <Tags tags={w.labels} />
                      </td>
                      <td title={w.tasks.join("\n")}>
                        <Bar parts={[[w.slots ? w.usedSlots / w.slots : 0, "busy"]]} /> {fmtInt(w.usedSlots)} / {fmtInt(w.slots)}
                        {w.tasks.length ? <span class="muted small"> ({w.tasks.length} tasks)</span> : null}
                      </td>
                      <td>
                        <TimeAgo ms={tsMs(w.lastSeen)} now={now} />
                      </td>
                    </tr>
                  ))}
                </tbody>
              );
            })}
          </table>
        ) : null}
      </Section>
      <Section title="Queues">
        {queues === null && !errors[1] ? <p class="muted">Loading…</p> : null}
        {queues !== null && queues.length === 0 ? <p class="empty">No task is queued or running.</p> : null}
        {queues !== null && queues.length > 0 ? (
          <table class="grid" data-testid="queues">
            <thead>
              <tr>
                <th>Task type</th>
                <th>Version</th>
                <th>Labels</th>
                <th class="num">Slots/task</th>
                <th class="num">Queued</th>
                <th class="num">Running</th>
                <th>Oldest queued</th>
                <th class="num">Matching workers</th>
                <th class="num">Free slots</th>
              </tr>
            </thead>
            <tbody>
              {queues.map((q, i) => {
                const age = durationPbMs(q.oldestAge);
                const starving = q.queued > 0 && q.matchingWorkers === 0;
                return (
                  <tr key={i} data-testid="queue-row" data-task-type={q.taskType} class={starving ? "starving" : ""}>
                    <td class="mono">{q.taskType}</td>
                    <td class="mono">{q.versionRequirement || "*"}</td>
                    <td>
                      <Tags tags={q.labels} />
                    </td>
                    <td class="num">{fmtInt(q.slotsPerTask || 1)}</td>
                    <td class="num">{fmtInt(q.queued)}</td>
                    <td class="num">{fmtInt(q.running)}</td>
                    <td>{age !== undefined ? fmtDuration(age) : <span class="muted">—</span>}</td>
                    <td class="num" title={starving ? "no connected worker can take these tasks" : ""}>
                      {fmtInt(q.matchingWorkers)}
                    </td>
                    <td class="num">{fmtInt(q.freeSlots)}</td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        ) : null}
      </Section>
    </div>
  );
}
