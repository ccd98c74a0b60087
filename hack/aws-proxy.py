#!/usr/bin/env python3
"""A loopback proxy in front of moto for Pacer's tests.

It forwards every AWS request to moto, records each action with its parameters, injects AWS
errors on request, answers the Pricing API (which moto lacks) with a realistic price document,
serves DeleteLaunchTemplateVersions (which moto answers with HTTP 500), and answers
DescribeSpotPriceHistory from a table a test sets (moto has one constant spot price), and keeps
RunInstances and CreateFleet ClientTokens as EC2 does (moto ignores them): the same token with the
same parameters replays the first successful answer (an empty fleet included) and launches
nothing; the same token with other parameters is refused with IdempotentParameterMismatch (400).
A RunInstances asking for up to MaxCount instances gets MaxCount, as from EC2 with capacity (moto
launches MinCount).
Calls that draw instance addresses go to moto one at a time: moto's address generator has no
lock, and two launches at once could fail one with HTTP 500 after it had made part of its
instances, which EC2 never does.

Control endpoints, all JSON:
  GET    /_proxy/health            -> {"ok": true}
  GET    /_proxy/calls             -> [{"seq", "service", "action", "params", "status"}, ...]
  DELETE /_proxy/calls             forget recorded calls
  POST   /_proxy/faults            add a fault: {"action", "code", "message"?, "status"?, "count"?,
                                   "fleet_error"?: true (CreateFleet answers 200 with Errors[]),
                                   "capacity"?: N (an instant CreateFleet launches at most N of
                                   the instances it asks for and answers 200 with an Errors[]
                                   item, "code", for the rest, as EC2 does short of capacity; a
                                   RunInstances launches at most N, at least its MinCount),
                                   "delay_answer"?: seconds (the call goes through at once and its
                                   ClientToken is kept, but the answer comes this much later, as
                                   from an overloaded endpoint or a lost connection),
                                   "lose_answer"?: true (the call goes through and its ClientToken
                                   is kept, but the connection drops before any answer: retries,
                                   replays included, are lost the same way while the fault lasts),
                                   "match"?: {"param": "substring"} (only requests whose params match)}
  DELETE /_proxy/faults            drop every fault
  POST   /_proxy/describe-lag      {"seconds": N, "match"?: "substring"}: DescribeInstances leaves
                                   out instances launched less than N seconds ago (only those with
                                   a tag value containing the substring), as EC2's eventually
                                   consistent listing does (moto lists them at once)
  GET    /_proxy/describe-lag      {"hidden": N}: how many listed instances the lag has left out
                                   so far, so a test can prove the fault fired
  POST   /_proxy/spot-reclaimed    {"instance": "i-..."}: DescribeInstances gives that (terminated)
                                   instance EC2's state reason for a spot interruption,
                                   Server.SpotInstanceTermination (moto has only the user's)
  POST   /_proxy/spot-prices       set spot prices: {"instance type": {"zone": "price"}}; history
                                   requests for a type in the table are answered from it
  POST   /_proxy/reset             drop calls, faults and spot prices and reset moto
Every recorded call carries "resource_tags": the tags, as the creating request set them, of
each resource the call names that was created through this proxy (instances, launch templates),
so an IAM simulation can evaluate aws:ResourceTag conditions. With AWS_PROXY_CALL_LOG set to a
directory, each call is also appended there as a JSON line (one file per proxy).
Usage: aws-proxy.py LISTEN_PORT MOTO_URL
"""

import http.client
import json
import os
import re
import sys
import threading
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# On-demand Linux prices in us-east-1, USD per hour, as AWS published them.
ON_DEMAND_USD = {
    "t3.micro": "0.0104000000", "t3.small": "0.0208000000", "t3.medium": "0.0416000000",
    "t3.large": "0.0832000000", "m5.large": "0.0960000000", "m5.xlarge": "0.1920000000",
    "m6i.large": "0.0960000000", "m6i.xlarge": "0.1920000000", "m7i.large": "0.1008000000",
    "c5.large": "0.0850000000", "c5.xlarge": "0.1700000000", "c6i.large": "0.0850000000",
    "c6i.xlarge": "0.1700000000", "c7i.large": "0.0892500000", "m6g.large": "0.0770000000",
    "m7g.large": "0.0816000000", "c6g.large": "0.0680000000", "c7g.large": "0.0725000000",
    "r5.large": "0.1260000000",
}

LOCK = threading.Lock()
CALLS = []
FAULTS = []
SPOT_PRICES = {}
# ClientToken -> (parameters without the token, content type, body of the first 200 answer).
TOKENS = {}
IDEMPOTENT_ACTIONS = ("RunInstances", "CreateFleet")
# Resource id or launch template name -> the tags its creating request set.
RESOURCE_TAGS = {}
CALL_LOG = os.environ.get("AWS_PROXY_CALL_LOG")
# (seconds, tag value substring) pairs.
DESCRIBE_LAG = []
# Instances the lag has left out of DescribeInstances answers.
HIDDEN = [0]
# Instances EC2 reclaimed for a spot interruption, as their state reason says.
SPOT_RECLAIMED = set()
EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
ET.register_namespace("", EC2_NS)
# ClientToken -> the lock its calls are answered under, one at a time.
TOKEN_LOCKS = {}
# moto draws each new instance's address from its subnet's shared generator without a lock:
# two launches at once into one subnet can fail one of them with HTTP 500 after moto made part
# of its instances, which EC2 never does (a launch is whole, or replayed by its token). The
# actions that draw addresses go to moto one at a time.
ADDRESSING_ACTIONS = ("RunInstances", "CreateFleet", "RequestSpotInstances", "RequestSpotFleet",
                      "CreateNetworkInterface")
ADDRESSING = threading.Lock()


def token_lock(token):
    if not token:
        return None
    with LOCK:
        return TOKEN_LOCKS.setdefault(token, threading.Lock())


# EBS storage prices per GB-month as the Price List gives them for us-east-1.
VOLUME_USD = {"gp3": "0.0800000000", "gp2": "0.1000000000", "io1": "0.1250000000", "io2": "0.1250000000"}


def product_document(seed, family, attributes, unit, description, usd):
    """One product of the AWS Price List with one on-demand price, shaped as GetProducts
    returns it (a JSON string); `seed` makes its SKU."""
    sku = uuid.uuid5(uuid.NAMESPACE_DNS, seed).hex[:16].upper()
    offer = sku + ".JRTCKXETXF"
    return json.dumps({
        "product": {
            "productFamily": family,
            "attributes": dict(attributes, servicecode="AmazonEC2"),
            "sku": sku,
        },
        "serviceCode": "AmazonEC2",
        "terms": {"OnDemand": {offer: {
            "priceDimensions": {offer + ".6YS6EN2CT7": {
                "unit": unit, "endRange": "Inf", "beginRange": "0",
                "description": description,
                "appliesTo": [], "rateCode": offer + ".6YS6EN2CT7",
                "pricePerUnit": {"USD": usd},
            }},
            "sku": sku, "effectiveDate": "2026-11-01T00:00:00Z", "offerTermCode": "JRTCKXETXF",
            "termAttributes": {},
        }}},
        "version": "20261101000000", "publicationDate": "2026-11-01T00:00:00Z",
    })


def volume_price_document(volume_type, region):
    """One EBS storage product of the AWS Price List (unit GB-Mo)."""
    usd = VOLUME_USD[volume_type]
    return product_document(
        "ebs" + volume_type + region, "Storage",
        {"volumeApiName": volume_type, "regionCode": region,
         "usagetype": "EBS:VolumeUsage." + volume_type},
        "GB-Mo", "$%s per GB-month of %s provisioned storage" % (usd, volume_type), usd)


def price_document(instance_type, region):
    """One Linux on-demand instance product of the AWS Price List (unit Hrs)."""
    usd = ON_DEMAND_USD[instance_type]
    return product_document(
        instance_type + region, "Compute Instance",
        {"instanceType": instance_type, "regionCode": region, "operatingSystem": "Linux",
         "tenancy": "Shared", "preInstalledSw": "NA", "capacitystatus": "Used",
         "usagetype": "BoxUsage:" + instance_type},
        "Hrs", "$%s per On Demand Linux %s Instance Hour" % (usd, instance_type), usd)


def service_of(headers):
    auth = headers.get("Authorization", "")
    # AWS4-HMAC-SHA256 Credential=AKID/20261122/us-east-1/ec2/aws4_request, ...
    try:
        return auth.split("Credential=")[1].split(",")[0].split("/")[3]
    except IndexError:
        return ""


def xml_error(service, code, message):
    rid = str(uuid.uuid4())
    if service == "ec2":
        return ("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>%s</Code>"
                "<Message>%s</Message></Error></Errors><RequestID>%s</RequestID></Response>" % (code, message, rid))
    return ("<ErrorResponse><Error><Type>Sender</Type><Code>%s</Code><Message>%s</Message></Error>"
            "<RequestId>%s</RequestId></ErrorResponse>" % (code, message, rid))


def fleet_error_body(params, code, message):
    return ("<CreateFleetResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>%s</requestId>"
            "<fleetId>fleet-%s</fleetId><errorSet>%s</errorSet><fleetInstanceSet/></CreateFleetResponse>"
            % (uuid.uuid4(), uuid.uuid4(), fleet_error_items(params, code, message)))


def fleet_error_items(params, code, message):
    items = []
    overrides = sorted({v for k, v in params.items() if k.endswith(".InstanceType") and "Overrides" in k})
    for itype in overrides or [""]:
        items.append("<item><launchTemplateAndOverrides><overrides><instanceType>%s</instanceType></overrides>"
                     "</launchTemplateAndOverrides><lifecycle>%s</lifecycle><errorCode>%s</errorCode>"
                     "<errorMessage>%s</errorMessage></item>"
                     % (itype, "spot" if "SpotOptions" in "".join(params) else "on-demand", code, message))
    return "".join(items)


def hide_recent_launches(data, lags):
    """DescribeInstances as EC2 answers shortly after a launch: instances launched less than a
    lag ago (for those whose tags match it) are not listed yet."""
    root = ET.fromstring(data)
    now = datetime.now(timezone.utc).timestamp()
    # The answer's own namespace: moto's has no trailing slash, EC2's has one.
    q = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    for reservation in root.iter(q + "reservationSet"):
        for item in list(reservation):
            instances = item.find(q + "instancesSet")
            if instances is None:
                continue
            for instance in list(instances):
                launched = instance.findtext(q + "launchTime") or ""
                try:
                    at = datetime.strptime(launched[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
                except ValueError:
                    continue
                values = " ".join(v.text or "" for v in instance.iter(q + "value"))
                if any(now - at.timestamp() < lag and sub in values for lag, sub in lags):
                    instances.remove(instance)
                    HIDDEN[0] += 1
            if len(instances) == 0:
                reservation.remove(item)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def spot_reclaimed(data, ids):
    """DescribeInstances with the state reason EC2 gives an instance it reclaimed."""
    root = ET.fromstring(data)
    q = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    for instance in root.iter(q + "item"):
        if instance.findtext(q + "instanceId") not in ids:
            continue
        reason = instance.find(q + "stateReason")
        if reason is None:
            reason = ET.SubElement(instance, q + "stateReason")
        for child in list(reason):
            reason.remove(child)
        ET.SubElement(reason, q + "code").text = "Server.SpotInstanceTermination"
        ET.SubElement(reason, q + "message").text = "Server.SpotInstanceTermination: Spot instance termination"
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def tags_for(params, resource_type):
    """The tags a query-protocol request sets on resources of `resource_type`."""
    tags = {}
    for key, value in params.items():
        m = re.fullmatch(r"TagSpecification\.(\d+)\.ResourceType", key)
        if m and value == resource_type:
            n = m.group(1)
            for k, v in params.items():
                t = re.fullmatch(r"TagSpecification\.%s\.Tag\.(\d+)\.Key" % n, k)
                if t:
                    tags[v] = params.get("TagSpecification.%s.Tag.%s.Value" % (n, t.group(1)), "")
    return tags


def remember_created(action, params, data):
    """Keeps the tags of what a successful create call made, by the ids in its answer."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    if action in ("RunInstances", "CreateFleet"):
        tags = tags_for(params, "instance")
        ids = re.findall(r"<instanceId>(i-[0-9a-f]+)</instanceId>", text)
        ids += re.findall(r"<item>(i-[0-9a-f]+)</item>", text)
        for instance_id in ids:
            RESOURCE_TAGS[instance_id] = tags
    elif action == "CreateLaunchTemplate":
        tags = tags_for(params, "launch-template")
        for template_id in re.findall(r"<launchTemplateId>(lt-[0-9a-f]+)</launchTemplateId>", text):
            RESOURCE_TAGS[template_id] = tags
        if params.get("LaunchTemplateName"):
            RESOURCE_TAGS[params["LaunchTemplateName"]] = tags


def is_pacer(headers):
    """Whether the request came from Pacer's AWS adapter (`app/pacer` in the User-Agent)."""
    return re.search(r"(^|\s)app/pacer(\s|$)", headers.get("User-Agent", "")) is not None


def agent(headers):
    """The app name in the request's User-Agent (`app/<name>`), to tell two callers apart."""
    found = re.search(r"(?:^|\s)app/(\S+)", headers.get("User-Agent", ""))
    return found.group(1) if found else ""


def record(entry):
    """Appends a call to the record, with the tags of the resources it names."""
    with LOCK:
        named = {v: RESOURCE_TAGS[v] for v in entry["params"].values()
                 if isinstance(v, str) and v in RESOURCE_TAGS}
        entry = dict(entry, seq=len(CALLS) + 1, resource_tags=named)
        CALLS.append(entry)
        if CALL_LOG:
            os.makedirs(CALL_LOG, exist_ok=True)
            with open(os.path.join(CALL_LOG, "calls-%d.jsonl" % os.getpid()), "a") as log:
                log.write(json.dumps(entry) + "\n")


def matches(params, wanted):
    """True when, for every key in `wanted`, some parameter named key (or ending in .key)
    contains the wanted substring."""
    return all(any((k == key or k.endswith("." + key)) and sub in str(v) for k, v in params.items())
               for key, sub in wanted.items())


def take_fault(action, params, lost=False):
    """The first fault for this call, counted; `lost` picks lose_answer faults, else others."""
    with LOCK:
        for fault in FAULTS:
            if bool(fault.get("lose_answer")) != lost:
                continue
            if fault["action"] == action and fault["count"] != 0 and matches(params, fault.get("match") or {}):
                if fault["count"] > 0:
                    fault["count"] -= 1
                return dict(fault)
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def reply(self, status, body, content_type="application/json", extra=None):
        data = body.encode() if isinstance(body, str) else body
        self.sent = (status, content_type, data)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def control(self, method, raw):
        path = self.path.split("?")[0]
        with LOCK:
            if path == "/_proxy/health":
                return self.reply(200, '{"ok": true}')
            if path == "/_proxy/calls" and method == "GET":
                return self.reply(200, json.dumps(CALLS))
            if path == "/_proxy/calls" and method == "DELETE":
                CALLS.clear()
                return self.reply(200, "{}")
            if path == "/_proxy/faults" and method == "POST":
                fault = json.loads(raw)
                fault.setdefault("count", 1)
                fault.setdefault("status", 400)
                fault.setdefault("message", "injected by the test proxy")
                FAULTS.append(fault)
                return self.reply(200, "{}")
            if path == "/_proxy/faults" and method == "DELETE":
                FAULTS.clear()
                return self.reply(200, "{}")
            if path == "/_proxy/spot-prices" and method == "POST":
                for itype, zones in json.loads(raw).items():
                    SPOT_PRICES.setdefault(itype, {}).update(zones)
                return self.reply(200, "{}")
            if path == "/_proxy/describe-lag" and method == "GET":
                return self.reply(200, json.dumps({"hidden": HIDDEN[0]}))
            if path == "/_proxy/describe-lag" and method == "POST":
                lag = json.loads(raw)
                DESCRIBE_LAG.append((float(lag.get("seconds", 0)), lag.get("match") or ""))
                return self.reply(200, "{}")
            if path == "/_proxy/spot-reclaimed" and method == "POST":
                SPOT_RECLAIMED.add(json.loads(raw)["instance"])
                return self.reply(200, "{}")
            if path == "/_proxy/reset" and method == "POST":
                SPOT_RECLAIMED.clear()
                DESCRIBE_LAG.clear()
                CALLS.clear()
                FAULTS.clear()
                SPOT_PRICES.clear()
                TOKENS.clear()
        if path == "/_proxy/reset" and method == "POST":
            self.forward("POST", "/moto-api/reset", b"", {})
            return self.reply(200, "{}")
        return self.reply(404, '{"error": "unknown control path"}')

    def forward(self, method, path, raw, headers):
        if getattr(self, "action", "") in ADDRESSING_ACTIONS:
            with ADDRESSING:
                return self.forward_now(method, path, raw, headers)
        return self.forward_now(method, path, raw, headers)

    def forward_now(self, method, path, raw, headers):
        conn = http.client.HTTPConnection(UPSTREAM.hostname, UPSTREAM.port, timeout=120)
        conn.request(method, path, body=raw, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, resp.getheaders(), data

    def handle_any(self, method):
        self.sent = None
        self.action = ""
        raw = self.body()
        if self.path.startswith("/_proxy/"):
            return self.control(method, raw)
        service = service_of(self.headers)
        target = self.headers.get("X-Amz-Target", "")
        if target:
            action = target.split(".")[-1]
            try:
                params = json.loads(raw or b"{}")
            except ValueError:
                params = {}
        else:
            query = raw.decode() if method == "POST" else urllib.parse.urlsplit(self.path).query
            params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
            action = params.get("Action", "")
        self.action = action
        flat = params if not target else {k: json.dumps(v) for k, v in params.items()}
        token = params.get("ClientToken") if action in IDEMPOTENT_ACTIONS else None
        rest = {k: v for k, v in params.items() if k != "ClientToken"}
        # Calls under one token are answered one at a time, as EC2 makes one launch of them; a
        # late answer lets the next in once EC2 has acted (see late_answer).
        self.held = token_lock(token)
        if self.held:
            self.held.acquire()
        try:
            self.call(method, raw, service, target, action, params, flat, token, rest)
        finally:
            self.release_token()

    def release_token(self):
        if getattr(self, "held", None):
            self.held.release()
            self.held = None

    def call(self, method, raw, service, target, action, params, flat, token, rest):
        with LOCK:
            known = TOKENS.get(token) if token else None
        replayed = known is not None
        if take_fault(action, flat, lost=True):
            if not known:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "content-length")}
                status, resp_headers, data = self.forward(method, self.path, raw, headers)
                if token and status == 200:
                    with LOCK:
                        TOKENS.setdefault(token, (rest, "text/xml", data))
                        remember_created(action, params, data)
            self.close_connection = True
            record({"service": service, "action": action, "params": params, "status": 0,
                    "replayed": replayed, "pacer": is_pacer(self.headers),
                "agent": agent(self.headers)})
            return
        if known and known[0] != rest:
            status = 400
            self.reply(400, xml_error(service, "IdempotentParameterMismatch",
                                      "The client token %s was used with other parameters" % token), "text/xml")
        elif known:
            status = 200
            self.reply(200, known[2], known[1])
        else:
            fault = take_fault(action, flat)
            self.sent = None
            try:
                if fault and fault.get("delay_answer"):
                    status = self.late_answer(method, raw, token, rest, fault["delay_answer"])
                else:
                    status = self.answer(method, raw, service, target, action, params, fault)
            finally:
                # EC2 keeps a launch's answer under its token whether or not the caller heard
                # it: a caller killed while the answer was being written replays it, too.
                if token and self.sent and self.sent[0] == 200:
                    with LOCK:
                        TOKENS.setdefault(token, (rest, self.sent[1], self.sent[2]))
                        if not target:
                            remember_created(action, params, self.sent[2])
        if status == 200 and self.sent and not target:
            with LOCK:
                remember_created(action, params, self.sent[2])
        record({"service": service, "action": action, "params": params, "status": status,
                "replayed": replayed, "pacer": is_pacer(self.headers),
                "agent": agent(self.headers)})

    def answer(self, method, raw, service, target, action, params, fault):
        if fault and fault.get("fleet_error"):
            self.reply(200, fleet_error_body(params, fault["code"], fault["message"]), "text/xml")
            return 200
        if fault and fault.get("capacity") is not None and action == "CreateFleet":
            return self.short_fleet(method, params, fault)
        if action == "RunInstances" and method == "POST" and int(params.get("MaxCount") or 1) > 1:
            # EC2 launches as many as it can up to MaxCount (at least MinCount); moto launches
            # MinCount. Asked for MaxCount, or `capacity` of them, moto does what EC2 would.
            n = int(params["MaxCount"])
            if fault and fault.get("capacity") is not None:
                n = max(int(params.get("MinCount") or 1), min(n, int(fault["capacity"])))
                fault = None
            raw = urllib.parse.urlencode(dict(params, MinCount=str(n), MaxCount=str(n))).encode()
        if fault:
            if target:
                self.reply(fault["status"], json.dumps({"__type": fault["code"], "message": fault["message"]}),
                           "application/x-amz-json-1.1", {"x-amzn-ErrorType": fault["code"]})
            else:
                self.reply(fault["status"], xml_error(service, fault["code"], fault["message"]), "text/xml")
            return fault["status"]
        if target.startswith("AWSPriceListService"):
            return self.pricing(action, params)
        if action == "DeleteLaunchTemplateVersions":
            return self.delete_launch_template_versions(params)
        if action == "DescribeSpotPriceHistory" and params.get("InstanceType.1") in SPOT_PRICES:
            return self.spot_price_history(params)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "content-length")}
        status, resp_headers, data = self.forward(method, self.path, raw, headers)
        if action == "DescribeInstances" and status == 200 and DESCRIBE_LAG:
            data = hide_recent_launches(data, list(DESCRIBE_LAG))
        if action == "DescribeInstances" and status == 200 and SPOT_RECLAIMED:
            data = spot_reclaimed(data, set(SPOT_RECLAIMED))
        content_type = dict((k.lower(), v) for k, v in resp_headers).get("content-type", "text/xml")
        self.sent = (status, content_type, data)
        self.send_response(status)
        for k, v in resp_headers:
            if k.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return status

    def short_fleet(self, method, params, fault):
        """An instant CreateFleet EC2 could fill only in part: at most `capacity` instances are
        launched, and the answer has an Errors[] item for the rest."""
        key = "TargetCapacitySpecification.TotalTargetCapacity"
        asked = int(params.get(key) or 1)
        given = max(1, min(asked, int(fault["capacity"])))
        body = urllib.parse.urlencode(dict(params, **{key: str(given)})).encode()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "content-length")}
        status, resp_headers, data = self.forward(method, self.path, body, headers)
        if status == 200 and given < asked:
            items = fleet_error_items(params, fault["code"], fault["message"])
            text = data.decode()
            if "<errorSet/>" in text:
                text = text.replace("<errorSet/>", "<errorSet>%s</errorSet>" % items, 1)
            elif "<errorSet>" in text:
                text = text.replace("<errorSet>", "<errorSet>" + items, 1)
            else:
                text = text.replace("</CreateFleetResponse>", "<errorSet>%s</errorSet></CreateFleetResponse>" % items, 1)
            data = text.encode()
        self.sent = (status, "text/xml", data)
        self.reply(status, data, "text/xml")
        return status

    def late_answer(self, method, raw, token, rest, delay):
        """Forwards the call now and answers it `delay` seconds later. EC2 has acted (and kept
        the token) before the caller hears of it."""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "content-length")}
        status, resp_headers, data = self.forward(method, self.path, raw, headers)
        content_type = dict((k.lower(), v) for k, v in resp_headers).get("content-type", "text/xml")
        if token and status == 200:
            with LOCK:
                TOKENS.setdefault(token, (rest, content_type, data))
        self.release_token()
        time.sleep(float(delay))
        try:
            self.reply(status, data, content_type)
        except OSError:
            pass  # the caller gave up waiting
        return status

    def pricing(self, action, params):
        if action != "GetProducts":
            self.reply(400, json.dumps({"__type": "InvalidParameterException", "message": action + " is not served"}),
                       "application/x-amz-json-1.1")
            return 400
        filters = {f.get("Field"): f.get("Value") for f in params.get("Filters", [])}
        itype = filters.get("instanceType")
        region = filters.get("regionCode") or "us-east-1"
        volume = filters.get("volumeApiName")
        if filters.get("productFamily") == "Storage":
            prices = [volume_price_document(volume, region)] if volume in VOLUME_USD else []
        else:
            prices = [price_document(itype, region)] if itype in ON_DEMAND_USD else []
        self.reply(200, json.dumps({"FormatVersion": "aws_v1", "PriceList": prices}), "application/x-amz-json-1.1")
        return 200

    def spot_price_history(self, params):
        itype, zone = params.get("InstanceType.1"), params.get("AvailabilityZone")
        with LOCK:
            prices = [(z, p) for z, p in SPOT_PRICES[itype].items() if zone in (None, z)]
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        items = "".join("<item><instanceType>%s</instanceType><productDescription>Linux/UNIX</productDescription>"
                        "<spotPrice>%s</spotPrice><timestamp>%s</timestamp><availabilityZone>%s</availabilityZone>"
                        "</item>" % (itype, p, now, z) for z, p in prices)
        self.reply(200, "<DescribeSpotPriceHistoryResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">"
                        "<requestId>%s</requestId><spotPriceHistorySet>%s</spotPriceHistorySet><nextToken/>"
                        "</DescribeSpotPriceHistoryResponse>" % (uuid.uuid4(), items), "text/xml")
        return 200

    def delete_launch_template_versions(self, params):
        # moto answers 500; real EC2 deletes the versions. Report each as deleted.
        lt_id = params.get("LaunchTemplateId", "")
        items = "".join("<item><launchTemplateId>%s</launchTemplateId><versionNumber>%s</versionNumber></item>"
                        % (lt_id, v) for k, v in params.items() if k.startswith("LaunchTemplateVersion."))
        self.reply(200, "<DeleteLaunchTemplateVersionsResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">"
                        "<requestId>%s</requestId><successfullyDeletedLaunchTemplateVersionSet>%s"
                        "</successfullyDeletedLaunchTemplateVersionSet><unsuccessfullyDeletedLaunchTemplateVersionSet/>"
                        "</DeleteLaunchTemplateVersionsResponse>" % (uuid.uuid4(), items), "text/xml")
        return 200

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")

    def do_DELETE(self):
        self.handle_any("DELETE")


if __name__ == "__main__":
    port = int(sys.argv[1])
    UPSTREAM = urllib.parse.urlsplit(sys.argv[2])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()
