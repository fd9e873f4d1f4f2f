// The shell: top navigation, the login form when a call was refused, and the page of the route.
import { useEffect, useRef, useState } from "preact/hooks";
import { type AuthNeed, codeName, currentAuthNeed, getToken, onAuthChange, requireLogin, setToken } from "../api";
import { href, type Route, useRoute } from "../router";
import { RunPage } from "./RunPage";
import { RunsPage } from "./RunsPage";
import { SchedulesPage } from "./SchedulesPage";
import { WorkersPage } from "./WorkersPage";
import { WorkflowPage, WorkflowsPage } from "./WorkflowsPage";

const SECTIONS: [string, string][] = [
  ["runs", "Runs"],
  ["workflows", "Workflows"],
  ["workers", "Workers"],
  ["schedules", "Schedules"],
];

function useAuth(): [AuthNeed | null, string] {
  const [state, setState] = useState(() => [currentAuthNeed(), getToken()] as [AuthNeed | null, string]);
  useEffect(() => onAuthChange(() => setState([currentAuthNeed(), getToken()])), []);
  return state;
}

export function App() {
  const route = useRoute();
  const [need, token] = useAuth();
  // Bumped when the token changes: the page remounts and loads its data with the new one.
  const [epoch, setEpoch] = useState(0);
  const section = route.path[0] ?? "runs";

  // A new token (typed, from a link's #...?token=, or none after "log out"): the page remounts
  // and loads its data again with it.
  const first = useRef(true);
  useEffect(() => {
    if (first.current) {
      first.current = false;
      return;
    }
    requireLogin(null);
    setEpoch((e) => e + 1);
  }, [token]);
  const login = (t: string) => {
    if (t !== token) return setToken(t);
    requireLogin(null); // the same token again: just try once more
    setEpoch((e) => e + 1);
  };

  return (
    <>
      <header class="top">
        <a class="brand" href={href(["runs"])}>
          dagmesh
        </a>
        <nav>
          {SECTIONS.map(([id, label]) => (
            <a key={id} href={href([id])} data-testid={`nav-${id}`} class={section === id ? "active" : ""}>
              {label}
            </a>
          ))}
        </nav>
        <span class="spacer" />
        {token ? (
          <button type="button" class="link" data-testid="logout" onClick={() => setToken("")} title="forget the stored token">
            log out
          </button>
        ) : (
          <button type="button" class="link" data-testid="login-open" onClick={() => requireLogin({ call: "", message: "" })}>
            log in
          </button>
        )}
      </header>
      {need ? <Login need={need} onLogin={login} onClose={() => requireLogin(null)} /> : null}
      <main key={epoch}>
        <Page route={route} />
      </main>
    </>
  );
}

function Page({ route }: { route: Route }) {
  const [section, id] = route.path;
  switch (section ?? "runs") {
    case "runs":
      return id ? <RunPage key={id} runId={id} route={route} /> : <RunsPage route={route} />;
    case "workflows":
      return id ? <WorkflowPage key={id} name={id} route={route} /> : <WorkflowsPage />;
    case "workers":
      return <WorkersPage />;
    case "schedules":
      return <SchedulesPage />;
    default:
      return (
        <div class="page">
          <p class="empty">
            Nothing here. <a href={href(["runs"])}>Go to the runs</a>.
          </p>
        </div>
      );
  }
}

function Login({ need, onLogin, onClose }: { need: AuthNeed; onLogin: (token: string) => void; onClose: () => void }) {
  const [text, setText] = useState("");
  return (
    <form
      class="login"
      data-testid="login"
      onSubmit={(e) => {
        e.preventDefault();
        if (text.trim()) onLogin(text.trim());
      }}
    >
      <div>
        {need.call ? (
          <p>
            <strong>{need.call}</strong> was refused ({codeName(need.code!)}
            {need.message ? `: ${need.message}` : ""}). Enter an API token
            {need.code !== undefined && codeName(need.code) === "PERMISSION_DENIED" ? " with the scope this needs" : ""}.
          </p>
        ) : (
          <p>Enter an API token.</p>
        )}
        <p class="muted small">
          It is kept in this browser's local storage and sent as <span class="mono">authorization: Bearer …</span>. Create one with{" "}
          <span class="mono">dagmesh tokens create --name NAME --scope read</span> (or use the admin token <span class="mono">dagmesh up</span> wrote).
        </p>
      </div>
      <input
        data-testid="login-token"
        type="password"
        autocomplete="off"
        placeholder="token"
        value={text}
        onInput={(e) => setText(e.currentTarget.value)}
        autoFocus
      />
      <button type="submit" class="primary" data-testid="login-submit">
        Use this token
      </button>
      <button type="button" class="link" onClick={onClose}>
        dismiss
      </button>
    </form>
  );
}
