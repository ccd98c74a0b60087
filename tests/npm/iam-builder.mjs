// Runs the policy builder page's own script (docs/iam-policy-builder.html) outside a browser
// and prints the policy it builds for the values given as JSON in argv[3].
// Usage: node iam-builder.mjs PAGE '{"account": "...", "region": "...", ...}'
import { readFileSync } from "node:fs";
import vm from "node:vm";

const [page, values] = process.argv.slice(2);
const html = readFileSync(page, "utf8");
const script = html.match(/<script id="builder">([\s\S]*?)<\/script>/)[1];
const context = vm.createContext({});
vm.runInContext(script, context);
process.stdout.write(context.buildPolicy(JSON.parse(values)));
