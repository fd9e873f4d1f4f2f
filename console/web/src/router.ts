// Routing by location hash: `#/runs`, `#/runs/<id>?step=x`, `#/workflows/<name>`... The hash
// keeps the server side trivial (it serves one page at `/`) and survives a reload.
import { useEffect, useState } from "preact/hooks";
import { setToken } from "./api";

export interface Route {
  /** Decoded path segments: `#/runs/abc` -> ["runs", "abc"]. */
  path: string[];
  query: URLSearchParams;
}

const ROUTE_EVENT = "dagmesh:route";

export function parseHash(hash: string): Route {
  const text = hash.replace(/^#/, "");
  const q = text.indexOf("?");
  const pathText = q < 0 ? text : text.slice(0, q);
  const query = new URLSearchParams(q < 0 ? "" : text.slice(q + 1));
  const path = pathText
    .split("/")
    .filter((part) => part !== "")
    .map((part) => {
      try {
        return decodeURIComponent(part);
      } catch {
        return part;
      }
    });
  return { path, query };
}

export function formatHash(path: string[], query?: URLSearchParams | Record<string, string>): string {
  const params = query instanceof URLSearchParams ? query : new URLSearchParams(query ?? {});
  const qs = params.toString();
  return "#/" + path.map(encodeURIComponent).join("/") + (qs ? "?" + qs : "");
}

/** A link target, e.g. href(["runs", id]). */
export function href(path: string[], query?: Record<string, string>): string {
  return formatHash(path, query);
}

export function navigate(path: string[], query?: Record<string, string>): void {
  window.location.hash = formatHash(path, query);
}

/**
 * Changes the current query without a new history entry (filters typed letter by letter would
 * otherwise fill the back button). Empty values are removed.
 */
export function replaceQuery(updates: Record<string, string | null | undefined>): void {
  const route = parseHash(window.location.hash);
  for (const [key, value] of Object.entries(updates)) {
    if (value === null || value === undefined || value === "") route.query.delete(key);
    else route.query.set(key, value);
  }
  const hash = formatHash(route.path.length ? route.path : ["runs"], route.query);
  history.replaceState(history.state, "", hash);
  window.dispatchEvent(new Event(ROUTE_EVENT));
}

/**
 * A token handed over in the link (`#/runs/ID?token=abc`, what `dagmesh` prints) is stored and
 * removed from the address bar at once, so it does not stay in the history or get copied along.
 */
export function takeTokenFromHash(): void {
  const route = parseHash(window.location.hash);
  const token = route.query.get("token");
  if (token === null) return;
  route.query.delete("token");
  setToken(token);
  history.replaceState(history.state, "", formatHash(route.path, route.query));
}

export function useRoute(): Route {
  const [route, setRoute] = useState(() => parseHash(window.location.hash));
  useEffect(() => {
    const update = () => {
      takeTokenFromHash();
      setRoute(parseHash(window.location.hash));
    };
    window.addEventListener("hashchange", update);
    window.addEventListener(ROUTE_EVENT, update);
    return () => {
      window.removeEventListener("hashchange", update);
      window.removeEventListener(ROUTE_EVENT, update);
    };
  }, []);
  return route;
}
