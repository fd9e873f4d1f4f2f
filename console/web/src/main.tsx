// Entry point of the console.
import { render } from "preact";
import { App } from "./components/App";
import { takeTokenFromHash } from "./router";
import "./style.css";

takeTokenFromHash();
render(<App />, document.getElementById("app")!);
