// Workflows: the list (latest version of each), one workflow's versions with a DAG preview,
// and a submit form generated from its declared inputs.
import type { JsonObject, JsonValue } from "@bufbuild/protobuf";
import type { Value } from "@bufbuild/protobuf/wkt";
import { useEffect, useMemo, useState } from "preact/hooks";
import { type CallError, describeError, getWorkflow, runClient, UNARY, workflowClient } from "../api";
import { layoutGraph, specGraph } from "../dag";
import { fmtInt, parseTags, prettyJson, tsMs } from "../format";
import type { InputSpec, Workflow } from "../gen/dagmesh/v1/types_pb";
import { href, navigate, replaceQuery, type Route } from "../router";
import { ErrorBanner, TimeAgo } from "./common";
import { DagView } from "./DagView";

export function WorkflowsPage() {
  const [list, setList] = useState<Workflow[] | null>(null);
  const [error, setError] = useState<CallError | null>(null);
  const [filter, setFilter] = useState("");
  const [reload, setReload] = useState(0);

  useEffect(() => {
    const ctl = new AbortController();
    workflowClient.listWorkflows({}, { ...UNARY, signal: ctl.signal }).then(
      (res) => {
        setList([...res.workflows].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)));
        setError(null);
      },
      (err) => !ctl.signal.aborted && setError(describeError("WorkflowService.ListWorkflows", err)),
    );
    return () => ctl.abort();
  }, [reload]);

  const shown = (list ?? []).filter((w) => !filter || w.name.toLowerCase().includes(filter.toLowerCase()));
  return (
    <div class="page">
      <div class="page-head">
        <h1>Workflows</h1>
        <input type="search" placeholder="filter by name" value={filter} onInput={(e) => setFilter(e.currentTarget.value)} data-testid="filter-workflows" />
        <button type="button" onClick={() => setReload((r) => r + 1)}>
          Refresh
        </button>
      </div>
      <ErrorBanner error={error} />
      {list === null && !error ? <p class="muted">Loading…</p> : null}
      {list !== null ? (
        <table class="grid" data-testid="workflows">
          <thead>
            <tr>
              <th>Name</th>
              <th>Latest</th>
              <th>Versions</th>
              <th>Steps</th>
              <th>Inputs</th>
              <th>Updated</th>
              <th>Description</th>
              <th />
            </tr>
          </thead>
          <tbody>
            {shown.map((w) => (
              <tr key={w.name} data-testid="workflow-row" data-name={w.name}>
                <td>
                  <a href={href(["workflows", w.name])}>{w.name}</a>
                </td>
                <td class="num">v{w.version}</td>
                <td>
                  {Array.from({ length: Math.min(w.version, 8) }, (_, i) => w.version - i).map((v) => (
                    <a key={v} class="version" href={href(["workflows", w.name], { version: String(v) })}>
                      {v}
                    </a>
                  ))}
                  {w.version > 8 ? <span class="muted">…</span> : null}
                </td>
                <td class="num">{fmtInt(w.spec?.steps.length ?? 0)}</td>
                <td>{Object.keys(w.spec?.inputs ?? {}).join(", ") || <span class="muted">any</span>}</td>
                <td>
                  <TimeAgo ms={tsMs(w.createdAt)} />
                </td>
                <td class="desc">{w.spec?.description}</td>
                <td>
                  <a href={href(["runs"], { workflow: w.name })}>runs</a>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      ) : null}
      {list !== null && shown.length === 0 ? <p class="empty">No workflows{filter ? " match" : " registered yet (dagmesh workflows apply FILE)"}.</p> : null}
    </div>
  );
}

export function WorkflowPage({ name, route }: { name: string; route: Route }) {
  const version = Number(route.query.get("version")) || 0;
  const [latest, setLatest] = useState<number>(0);
  const [wf, setWf] = useState<Workflow | null>(null);
  const [error, setError] = useState<CallError | null>(null);

  useEffect(() => {
    let live = true;
    setWf(null);
    getWorkflow(name, version).then(
      (w) => {
        if (!live) return;
        setWf(w);
        setError(null);
        if (version === 0) setLatest(w.version);
      },
      (err) => live && setError(describeError("WorkflowService.GetWorkflow", err)),
    );
    if (version !== 0) {
      // The version list needs the latest number.
      workflowClient.getWorkflow({ name, version: 0 }, UNARY).then(
        (w) => live && setLatest(w.version),
        () => undefined,
      );
    }
    return () => {
      live = false;
    };
  }, [name, version]);

  const graph = useMemo(() => specGraph(wf?.spec), [wf]);
  const layout = useMemo(() => layoutGraph(graph), [graph]);

  return (
    <div class="page" data-testid="workflow-page" data-name={name}>
      <div class="page-head">
        <h1>
          <a href={href(["workflows"])}>Workflows</a> › {name}
        </h1>
        <label>
          version{" "}
          <select data-testid="workflow-version" value={String(version || latest)} onChange={(e) => replaceQuery({ version: e.currentTarget.value })}>
            {Array.from({ length: latest }, (_, i) => latest - i).map((v) => (
              <option key={v} value={String(v)}>
                {v}
                {v === latest ? " (latest)" : ""}
              </option>
            ))}
          </select>
        </label>
        <a href={href(["runs"], { workflow: name })}>its runs</a>
      </div>
      <ErrorBanner error={error} />
      {wf === null && !error ? <p class="muted">Loading…</p> : null}
      {wf ? (
        <>
          <section class="card">
            {wf.spec?.description ? <p>{wf.spec.description}</p> : null}
            <dl class="facts wide">
              <dt>Version</dt>
              <dd>{wf.version}</dd>
              <dt>Created</dt>
              <dd>
                <TimeAgo ms={tsMs(wf.createdAt)} />
              </dd>
              <dt>Content hash</dt>
              <dd class="mono small">{wf.contentHash}</dd>
              <dt>Steps</dt>
              <dd>
                {fmtInt(wf.spec?.steps.length ?? 0)}
                {wf.spec?.continueOnFailure ? <span class="muted"> (continue on failure)</span> : null}
              </dd>
            </dl>
          </section>
          <section class="card">
            <div class="card-head">
              <h2>Graph</h2>
            </div>
            <DagView graph={graph} layout={layout} />
          </section>
          <SubmitForm wf={wf} />
          <details class="card">
            <summary>
              <h2>Spec</h2>
            </summary>
            <pre class="json">{prettyJson(specJson(wf))}</pre>
          </details>
        </>
      ) : null}
    </div>
  );
}

/** The spec as plain JSON for reading (field names as in protobuf-es). */
function specJson(wf: Workflow): unknown {
  return JSON.parse(
    JSON.stringify(wf.spec ?? {}, (k, v) => {
      if (k === "$typeName") return undefined;
      if (typeof v === "bigint") return v.toString();
      return v;
    }),
  );
}

/** google.protobuf.Value (a message) as the JSON it stands for. */
function valueJson(v: Value | undefined): JsonValue | undefined {
  if (!v) return undefined;
  const k = v.kind;
  switch (k.case) {
    case "nullValue":
      return null;
    case "numberValue":
    case "stringValue":
    case "boolValue":
      return k.value;
    case "listValue":
      return k.value.values.map((x) => valueJson(x) ?? null);
    case "structValue": {
      const out: JsonObject = {};
      for (const [key, x] of Object.entries(k.value.fields)) out[key] = valueJson(x) ?? null;
      return out;
    }
    default:
      return undefined;
  }
}

/** Reads a form field as the declared input type; throws a message naming the input. */
function convert(name: string, type: string, raw: string): JsonValue {
  switch (type) {
    case "string":
      return raw;
    case "int": {
      const n = Number(raw);
      if (!Number.isInteger(n)) throw new Error(`${name}: "${raw}" is not an integer`);
      return n;
    }
    case "number": {
      const n = Number(raw);
      if (raw.trim() === "" || !Number.isFinite(n)) throw new Error(`${name}: "${raw}" is not a number`);
      return n;
    }
    case "bool":
      return raw === "true";
    case "any":
      try {
        return JSON.parse(raw) as JsonValue;
      } catch {
        return raw; // plain text is a string
      }
    default: {
      let v: JsonValue;
      try {
        v = JSON.parse(raw) as JsonValue;
      } catch (e) {
        throw new Error(`${name}: not valid JSON (${(e as Error).message})`);
      }
      if (type === "list" && !Array.isArray(v)) throw new Error(`${name}: a list is expected, like [1, 2]`);
      if (type === "object" && (v === null || typeof v !== "object" || Array.isArray(v))) {
        throw new Error(`${name}: an object is expected, like {"a": 1}`);
      }
      return v;
    }
  }
}

function SubmitForm({ wf }: { wf: Workflow }) {
  const declared = Object.entries(wf.spec?.inputs ?? {}).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  const [values, setValues] = useState<Record<string, string>>({});
  const [json, setJson] = useState("{}");
  const [tags, setTags] = useState("");
  const [formError, setFormError] = useState<string | null>(null);
  const [error, setError] = useState<CallError | null>(null);
  const [busy, setBusy] = useState(false);

  const set = (name: string, value: string) => setValues((old) => ({ ...old, [name]: value }));

  async function submit(e: Event) {
    e.preventDefault();
    setFormError(null);
    setError(null);
    let inputs: JsonObject = {};
    try {
      if (declared.length) {
        for (const [name, spec] of declared) {
          const raw = values[name] ?? "";
          if (raw === "") {
            if (!spec.default) throw new Error(`${name} is required`);
            continue; // the server fills in the default
          }
          inputs[name] = convert(name, spec.type, raw);
        }
      } else {
        const v = JSON.parse(json || "{}") as JsonValue;
        if (v === null || typeof v !== "object" || Array.isArray(v)) throw new Error("the inputs must be a JSON object");
        inputs = v;
      }
    } catch (err) {
      setFormError((err as Error).message);
      return;
    }
    const tagMap = parseTags(tags);
    if (tagMap === null) {
      setFormError("tags are key=value, separated by commas");
      return;
    }
    setBusy(true);
    try {
      const res = await runClient.submitRun(
        { workflowRef: { case: "workflow", value: { name: wf.name, version: wf.version } }, inputs, tags: tagMap },
        UNARY,
      );
      if (res.run) navigate(["runs", res.run.runId]);
    } catch (err) {
      setError(describeError("RunService.SubmitRun", err));
    } finally {
      setBusy(false);
    }
  }

  return (
    <section class="card">
      <div class="card-head">
        <h2>Start a run</h2>
        <span class="muted small">
          of {wf.name} version {wf.version}
        </span>
      </div>
      <form class="submit" onSubmit={submit} data-testid="submit-form">
        {declared.length ? (
          declared.map(([name, spec]) => <InputField key={name} name={name} spec={spec} value={values[name] ?? ""} onChange={(v) => set(name, v)} />)
        ) : (
          <label class="field wide">
            <span class="name">Inputs (JSON)</span>
            <textarea data-testid="submit-inputs-json" rows={6} value={json} onInput={(e) => setJson(e.currentTarget.value)} spellcheck={false} />
            <span class="muted small">This workflow declares no inputs: any JSON object is accepted.</span>
          </label>
        )}
        <label class="field">
          <span class="name">Tags</span>
          <input data-testid="submit-tags" placeholder="key=value, key2=value2" value={tags} onInput={(e) => setTags(e.currentTarget.value)} />
        </label>
        {formError ? (
          <div class="banner error" data-testid="error" role="alert">
            {formError}
          </div>
        ) : null}
        <ErrorBanner error={error} />
        <div class="actions">
          <button type="submit" class="primary" data-testid="submit-run" disabled={busy}>
            Start run
          </button>
        </div>
      </form>
    </section>
  );
}

function InputField({ name, spec, value, onChange }: { name: string; spec: InputSpec; value: string; onChange: (v: string) => void }) {
  const def = valueJson(spec.default);
  const required = spec.default === undefined;
  const placeholder = def === undefined ? "" : `default: ${JSON.stringify(def)}`;
  const testid = `input-${name}`;
  let control;
  if (spec.type === "bool") {
    control = (
      <select data-testid={testid} value={value} onChange={(e) => onChange(e.currentTarget.value)}>
        <option value="">{required ? "(choose)" : `default (${JSON.stringify(def)})`}</option>
        <option value="true">true</option>
        <option value="false">false</option>
      </select>
    );
  } else if (spec.type === "list" || spec.type === "object" || spec.type === "any") {
    control = (
      <textarea
        data-testid={testid}
        rows={3}
        spellcheck={false}
        placeholder={placeholder || (spec.type === "list" ? "[ ... ] (JSON)" : spec.type === "object" ? "{ ... } (JSON)" : "JSON or text")}
        value={value}
        onInput={(e) => onChange(e.currentTarget.value)}
      />
    );
  } else if (spec.type === "int" || spec.type === "number") {
    control = (
      <input
        data-testid={testid}
        type="number"
        step={spec.type === "int" ? "1" : "any"}
        placeholder={placeholder}
        value={value}
        onInput={(e) => onChange(e.currentTarget.value)}
      />
    );
  } else {
    control = <input data-testid={testid} type="text" placeholder={placeholder} value={value} onInput={(e) => onChange(e.currentTarget.value)} />;
  }
  return (
    <label class="field">
      <span class="name">
        {name}
        {required ? <span class="req" title="required"> *</span> : null} <span class="type">{spec.type || "any"}</span>
      </span>
      {control}
      {spec.description ? <span class="muted small">{spec.description}</span> : null}
    </label>
  );
}
