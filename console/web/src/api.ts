// The API clients: gRPC-web to the server that served this page, with the stored bearer token.
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { ClusterService } from "./gen/dagmesh/v1/cluster_pb";
import { RunService } from "./gen/dagmesh/v1/run_pb";
import { SchedulerService } from "./gen/dagmesh/v1/scheduler_pb";
import type { Workflow } from "./gen/dagmesh/v1/types_pb";
import { WorkflowService } from "./gen/dagmesh/v1/workflow_pb";

const TOKEN_KEY = "dagmesh.token";

export function getToken(): string {
  try {
    return localStorage.getItem(TOKEN_KEY) ?? "";
  } catch {
    return ""; // storage disabled: calls go without a token
  }
}

export function setToken(token: string): void {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    // Nothing to do: without storage the token lasts until the next call fails.
  }
  notify();
}

/** Why the console asks for a token: the call that was refused, or a "log in" click. */
export interface AuthNeed {
  call: string;
  code?: Code;
  message: string;
}

let authNeed: AuthNeed | null = null;
const listeners = new Set<() => void>();

function notify() {
  for (const listener of listeners) listener();
}

export function currentAuthNeed(): AuthNeed | null {
  return authNeed;
}

export function requireLogin(need: AuthNeed | null): void {
  authNeed = need;
  notify();
}

export function onAuthChange(listener: () => void): () => void {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

/** Adds the stored token; a refusal for lack of credentials raises the login form. */
const auth: Interceptor = (next) => async (req) => {
  const token = getToken();
  if (token) req.header.set("authorization", `Bearer ${token}`);
  try {
    return await next(req);
  } catch (err) {
    // Streams fail here when the refusal comes before the first message (trailers-only);
    // failures later in a stream go through describeError at the call site.
    describeError(`${req.service.typeName.replace(/^dagmesh\.v1\./, "")}.${req.method.name}`, err);
    throw err;
  }
};

const transport = createGrpcWebTransport({
  baseUrl: window.location.origin,
  useBinaryFormat: true,
  interceptors: [auth],
});

export const runClient = createClient(RunService, transport);
export const workflowClient = createClient(WorkflowService, transport);
export const clusterClient = createClient(ClusterService, transport);
export const schedulerClient = createClient(SchedulerService, transport);

/** Deadline of unary calls; streams have none (they live as long as the page). */
export const UNARY = { timeoutMs: 20_000 };

const workflowCache = new Map<string, Promise<Workflow>>();

/** GetWorkflow; a numbered version never changes, so it is asked for once. */
export function getWorkflow(name: string, version: number): Promise<Workflow> {
  if (version === 0) return workflowClient.getWorkflow({ name, version }, UNARY);
  const key = `${name}@${version}`;
  let p = workflowCache.get(key);
  if (!p) {
    p = workflowClient.getWorkflow({ name, version }, UNARY);
    workflowCache.set(key, p);
    p.catch(() => workflowCache.delete(key));
  }
  return p;
}

/** A failed call, as the error banner shows it. */
export interface CallError {
  call: string;
  code: Code;
  codeName: string;
  message: string;
}

export function codeName(code: Code): string {
  return (Code[code] ?? String(code)).replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/**
 * Turns anything a call threw into a CallError. Unauthenticated and PermissionDenied also raise
 * the login form, so a missing or weak token can be replaced without leaving the page.
 */
export function describeError(call: string, err: unknown): CallError {
  const e = ConnectError.from(err);
  if (e.code === Code.Unauthenticated || e.code === Code.PermissionDenied) {
    if (!authNeed || authNeed.code === undefined) {
      requireLogin({ call, code: e.code, message: e.rawMessage });
    }
  }
  return { call, code: e.code, codeName: codeName(e.code), message: e.rawMessage || e.message };
}

/** Errors worth retrying: the server or the network may come back. */
export function isTransient(code: Code): boolean {
  return (
    code === Code.Unavailable ||
    code === Code.Unknown ||
    code === Code.Internal ||
    code === Code.DeadlineExceeded ||
    code === Code.Aborted ||
    code === Code.ResourceExhausted ||
    code === Code.Canceled
  );
}

export { Code };

/** Resolves after `ms`, or at once when the signal aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
  });
}
