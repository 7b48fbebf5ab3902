#!/usr/bin/env python3
"""Writes the hand-made seed inputs into fuzz/corpus/<target>/seed-*.

Run from anywhere: `python3 fuzz/gen_seeds.py`. Seeds are small and realistic: handshakes as
hyco-ws, hyco-https and the .NET client send them, real SAS tokens, frames of every length
class, control JSON as the relay and listeners send it, example config files. Files named
`seed-*` are rewritten; files that `cargo fuzz cmin` kept (named by hash) are left alone.

The frame targets read two option bytes before the stream (see src/fuzzing.rs): byte 0 picks
the frame limit (0: 1 MiB, 1: 16 bytes, 2: 0, 3: unlimited), byte 1 the split points
(0: whole, n: pieces of 1..=n bytes). The mask target reads key(4), offset(2, LE),
alignment(1), cut(1), then the payload.
"""

import base64
import hashlib
import hmac
import os
import struct
import urllib.parse

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
KEY = "J0J3GRnd0oq+HoKnOqLXm1jmjJM2Wov30j8nvRr2Jcg="  # the fuzz key (src/fuzzing.rs)
NS = "contoso-relay.servicebus.windows.net"


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def enc(s):
    """encodeURIComponent."""
    return urllib.parse.quote(s, safe="-_.!~*'()")


def token(uri, key_name, expiry, key=KEY, lower=False):
    sr = enc(uri)
    if lower:
        sr = sr.replace("%3A", "%3a").replace("%2F", "%2f")
    sig = base64.b64encode(hmac.new(key.encode(), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()).decode()
    return f"SharedAccessSignature sr={sr}&sig={enc(sig)}&se={expiry}&skn={key_name}"


# --- WebSocket frames -------------------------------------------------------------------

def frame(op, payload=b"", fin=True, mask=None, len_form=None, rsv=0):
    b0 = (0x80 if fin else 0) | rsv | op
    n = len(payload)
    form = len_form or ("7" if n < 126 else "16" if n < 65536 else "64")
    mbit = 0x80 if mask else 0
    if form == "7":
        head = bytes([b0, mbit | n])
    elif form == "16":
        head = bytes([b0, mbit | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, mbit | 127]) + struct.pack(">Q", n)
    if mask:
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        head += bytes(mask)
    return head + payload


def frames(opts, split, *parts):
    return bytes([opts, split]) + b"".join(parts)


def frame_seeds():
    k = [0x37, 0xFA, 0x21, 0x3D]
    hello = frame(0x1, b"Hello", mask=k)  # RFC 6455 §5.7
    renew = b'{"renewToken":{"token":"' + token(f"http://{NS}/hc1", "defaultListener", 1767225600).encode() + b'"}}'
    accept = ('{"accept":{"address":"wss://%s:443/$hc/hc1?sb-hc-action=accept&sb-hc-id=4f1c&sb-hc-rid=Zm9vYmFy",'
              '"id":"4f1c","connectHeaders":{"Host":"%s","Sec-WebSocket-Key":"dGhlIHNhbXBsZSBub25jZQ==",'
              '"Sec-WebSocket-Version":"13"},"remoteEndpoint":{"address":"203.0.113.7","port":51234}}}' % (NS, NS)).encode()
    blob = bytes(range(256)) * 2
    for role, m in (("frame_server", k), ("frame_client", None)):
        w = lambda *a, **kw: frame(*a, mask=m, **kw)
        write(role, "text-hello", frames(0, 0, w(0x1, b"Hello")))
        write(role, "text-hello-bytewise", frames(0, 1, w(0x1, b"Hello")))
        write(role, "binary-empty", frames(0, 0, w(0x2, b"")))
        write(role, "binary-125", frames(0, 7, w(0x2, blob[:125])))
        write(role, "binary-126-len16", frames(0, 13, w(0x2, blob[:126])))
        write(role, "binary-300-len16", frames(0, 64, w(0x2, blob[:300])))
        write(role, "binary-200-len64", frames(0, 5, w(0x2, blob[:200], len_form="64")))
        write(role, "binary-70000-truncated", frames(0, 0, w(0x2, b"\0" * 70000)[:80]))
        write(role, "binary-too-large-for-16", frames(1, 0, w(0x2, blob[:17])))
        write(role, "binary-unlimited", frames(3, 3, w(0x2, blob[:40], len_form="64")))
        write(role, "close-1000-bye", frames(0, 0, w(0x8, struct.pack(">H", 1000) + b"bye")))
        write(role, "close-1001-split", frames(0, 2, w(0x8, struct.pack(">H", 1001) + "going away é".encode())))
        write(role, "close-empty", frames(0, 0, w(0x8, b"")))
        write(role, "close-bad-code-1005", frames(0, 0, w(0x8, struct.pack(">H", 1005))))
        write(role, "close-1-byte", frames(0, 0, w(0x8, b"\x03")))
        write(role, "ping-pong", frames(0, 3, w(0x9, b"p"), w(0xA, b"p")))
        write(role, "ping-125", frames(0, 0, w(0x9, blob[:125])))
        write(role, "fragmented-text-ping-between",
              frames(0, 4, w(0x1, b"Hel", fin=False), w(0x9, b""), w(0x0, b"lo")))
        write(role, "fragmented-binary-3",
              frames(2, 9, w(0x2, blob[:10], fin=False), w(0x0, blob[10:20], fin=False), w(0x0, blob[20:30])))
        write(role, "continuation-without-start", frames(0, 0, w(0x0, b"x")))
        write(role, "text-inside-fragmented", frames(0, 0, w(0x1, b"a", fin=False), w(0x1, b"b")))
        write(role, "reserved-bit", frames(0, 0, w(0x2, b"x", rsv=0x40)))
        write(role, "unknown-opcode-3", frames(0, 0, w(0x3, b"x")))
        write(role, "ping-fragmented", frames(0, 0, w(0x9, b"x", fin=False)))
        write(role, "ping-len16", frames(0, 0, w(0x9, blob[:130])))
        write(role, "len64-msb-set", frames(0, 0, bytes([0x82, (0x80 if m else 0) | 127, 0x80] + [0] * 7) + bytes(m or [])))
        write(role, "renew-token-text", frames(0, 17, w(0x1, renew)))
        write(role, "accept-text", frames(0, 31, w(0x1, accept)))
        write(role, "tunnel-binary-then-close",
              frames(0, 11, w(0x2, b"SELECT 1;\n"), w(0xA, b""), w(0x8, struct.pack(">H", 1000))))
    write("frame_server", "unmasked-from-client", frames(0, 0, frame(0x1, b"Hello")))
    write("frame_client", "masked-from-server", frames(0, 0, hello))
    write("frame_server", "rfc-hello-masked", frames(0, 0, hello))


def mask_seeds():
    k = bytes([0x37, 0xFA, 0x21, 0x3D])
    write("mask", "rfc-hello", k + b"\0\0" + b"\0\0" + b"Hello")
    write("mask", "offset-3-align-5", k + b"\3\0" + b"\5\x07" + bytes(range(64)))
    write("mask", "offset-large", bytes([1, 2, 3, 4]) + b"\xff\xff" + b"\7\xff" + bytes(range(200)))
    write("mask", "empty", bytes([9, 8, 7, 6]) + b"\1\0" + b"\1\0")


# --- HTTP heads -------------------------------------------------------------------------

def crlf(lines, body=b""):
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def http_seeds():
    t_listen = token(f"http://{NS}/hc1", "defaultListener", 1767225600)
    t_send = token(f"https://{NS}/hc1", "defaultSender", 1767225600)
    write("http_request", "hyco-ws-listen", crlf([
        "GET /$hc/hc1?sb-hc-action=listen HTTP/1.1",
        "Connection: Upgrade", "Upgrade: websocket", f"Host: {NS}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: " + base64.b64encode(b"13-1767225600000").decode(),
        f"ServiceBusAuthorization: {t_listen}",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"]))
    write("http_request", "hyco-ws-listen-query-token", crlf([
        f"GET /$hc/hc1?sb-hc-action=listen&sb-hc-token={enc(t_listen)}&sb-hc-id=listener-1 HTTP/1.1",
        "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==",
        "Connection: Upgrade", "Upgrade: websocket",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits", f"Host: {NS}:443"]))
    write("http_request", "dotnet-listen", crlf([
        "GET /$hc/hc1?sb-hc-action=listen&sb-hc-id=2bc3a2c8-74e4-4d0e-9c23-6a1f8d1e7c55 HTTP/1.1",
        f"Host: {NS}", "Connection: Upgrade", "Upgrade: websocket",
        "Sec-WebSocket-Key: 9/Pf1vFjd3VE3LEDj6rLAA==", "Sec-WebSocket-Version: 13",
        f"ServiceBusAuthorization: {t_listen}",
        "Relay-User-Agent: azure-relay-dotnet/3.0.1 (Linux 6.8; .NET 8.0)"]))
    write("http_request", "dotnet-connect-suffix-query", crlf([
        "GET /%24hc/hc1/api/v1?tenant=a%20b&sb-hc-action=connect&sb-hc-id=9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d HTTP/1.1",
        f"Host: {NS}", "Connection: keep-alive, Upgrade", "Upgrade: websocket",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: chat, superchat", f"ServiceBusAuthorization: {t_send}"]))
    write("http_request", "accept-rendezvous", crlf([
        f"GET /$hc/hc1?sb-hc-action=accept&sb-hc-id=4f1c&sb-hc-rid=Zm9vYmFyYmF6cXV4 HTTP/1.1",
        f"Host: {NS}:443", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==", "Sec-WebSocket-Version: 13"]))
    write("http_request", "reject-rendezvous", crlf([
        "GET /$hc/hc1?sb-hc-action=accept&sb-hc-id=4f1c&sb-hc-rid=Zm9v&sb-hc-statusCode=502&sb-hc-statusDescription=Endpoint+is+down%21 HTTP/1.1",
        f"Host: {NS}", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==", "Sec-WebSocket-Version: 13"]))
    write("http_request", "runtime-info-get", crlf([
        "GET /hc1?api-version=2016-07 HTTP/1.1", f"Host: {NS}",
        f"Authorization: {t_listen}", "X-PROCESS-AT: ServiceBus", "Accept: */*"]))
    write("http_request", "rfc6455-example-with-frame", crlf([
        "GET /chat HTTP/1.1", "Host: server.example.com", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Origin: http://example.com",
        "Sec-WebSocket-Protocol: chat, superchat", "Sec-WebSocket-Version: 13"], frame(0x1, b"Hello", mask=[1, 2, 3, 4])))
    write("http_request", "bad-version-and-key", crlf([
        "GET /$hc/hc1?sb-hc-action=dance HTTP/1.1", "Host: x", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: short", "Sec-WebSocket-Version: 8"]))
    write("http_request", "post-http-mode", crlf([
        "POST /hc1/orders?id=7 HTTP/1.1", f"Host: {NS}", "Content-Type: application/json",
        "Content-Length: 2", f"ServiceBusAuthorization: {t_send}"], b"{}"))
    write("http_request", "incomplete-head", b"GET /$hc/hc1?sb-hc-action=listen HTTP/1.1\r\nHost: ns\r\nUpg")

    write("http_response", "rfc6455-101", crlf([
        "HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", "Sec-WebSocket-Protocol: chat"]))
    write("http_response", "101-with-first-frame", crlf([
        "HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Accept: HSmrc0sMlYUkAGmm5OPpG2HaGWk="], frame(0x1, b'{"accept":{}}')))
    write("http_response", "404-endpoint-missing", crlf([
        "HTTP/1.1 404 Endpoint does not exist. TrackingId:2bc3a2c8_G1, SystemTracker:sb://contoso/hc1",
        "Content-Type: text/plain; charset=utf-8", "Content-Length: 24", "Connection: close"],
        b"Endpoint does not exist."))
    write("http_response", "401-bad-signature", crlf([
        "HTTP/1.1 401 The token has an invalid signature.", "Content-Length: 0", "Connection: close"]))
    write("http_response", "200-atom-entry", crlf([
        "HTTP/1.1 200 OK", "Content-Type: application/atom+xml;type=entry;charset=utf-8",
        "Content-Length: 40", "Date: Thu, 01 Jan 2026 00:00:00 GMT"], b"<entry xmlns=\"http://www.w3.org/2005/Atom\">"))
    write("http_response", "http10-no-reason", b"HTTP/1.0 503\r\nRetry-After: 5\r\n\r\n")
    write("http_response", "incomplete", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: webso")


# --- tokens, connection strings, addresses ------------------------------------------------

def sas_seeds():
    write("sas_token", "hyco-listen", token(f"http://{NS}/hc1", "defaultListener", 1767225600))
    write("sas_token", "dotnet-https-send", token(f"https://{NS}/hc1/", "RootManageSharedAccessKey", 1767225600))
    write("sas_token", "lowercase-escapes", token(f"http://{NS}/hc1", "r", 100, lower=True))
    write("sas_token", "sb-namespace-scope", token(f"sb://{NS}", "RootManageSharedAccessKey", 4102444800))
    t = token("https://localhost:9443/My HC/sub", "defaultSender", 1767225600)
    write("sas_token", "port-and-space", t)
    write("sas_token", "fields-reordered-fractional-se",
          "sharedaccesssignature skn=defaultListener&se=1767225600.5&SIG=abc%2Bdef%3D&sr=http%3a%2f%2fns%2fhc1")
    write("sas_token", "ipv6-host", token("http://[::1]:9443/hc1", "k", 1))
    write("sas_token", "missing-se", "SharedAccessSignature sr=a&sig=b&skn=c")
    write("sas_token", "bad-encoding", "SharedAccessSignature sr=%C3%28&sig=%%%&se=1&skn=%ff")
    write("sas_token", "mint-resource-and-name", f"https://{NS}/hc1/sub?x=1#frag\ndefaultListener")
    write("sas_token", "bearer", "Bearer eyJhbGciOiJIUzI1NiJ9")


def connstr_seeds():
    key = "REPLACE_WITH_KEY+abc/def0123456789abcdefghij="
    write("connection_string", "gateway", f"Endpoint=sb://{NS}/;SharedAccessKeyName=defaultListener;SharedAccessKey={key};EntityPath=hc1")
    write("connection_string", "namespace-wide", f"Endpoint=sb://{NS}/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={key}")
    write("connection_string", "wss-port", f"Endpoint=wss://relay.local:9443/;SharedAccessKeyName=defaultSender;SharedAccessKey={key};EntityPath=db")
    write("connection_string", "ws-plain", f"Endpoint=ws://127.0.0.1:8080;SharedAccessKeyName=s;SharedAccessKey=k;EntityPath=/a/b/")
    write("connection_string", "ipv6", f"Endpoint=sb://[::1]:9443/;SharedAccessKeyName=s;SharedAccessKey=k")
    write("connection_string", "sas-token", "Endpoint=sb://ns/;SharedAccessSignature=" + token("http://ns/hc1", "s", 1767225600) + ";EntityPath=hc1")
    write("connection_string", "lowercase-spaces-extra", " endpoint = sb://ns/ ; sharedaccesskey=k ;SHAREDACCESSKEYNAME=r;OperationTimeout=00:01:00;;")
    write("connection_string", "managed-identity", f"Endpoint=sb://{NS}/;Authentication=Managed Identity;EntityPath=hc1")
    write("connection_string", "bad-segment", "Endpoint=sb://ns/;garbage;SharedAccessKey=k")
    write("connection_string", "bare-endpoint", "sb://ns.example:443/path")


def control_seeds():
    write("control_json", "accept-full", '{"accept":{"address":"wss://%s:443/$hc/hc1?sb-hc-action=accept&sb-hc-id=4f1c&sb-hc-rid=Zm9v","id":"4f1c","connectHeaders":{"Host":"%s","Sec-WebSocket-Key":"dGhlIHNhbXBsZSBub25jZQ==","Sec-WebSocket-Version":"13","Sec-WebSocket-Protocol":"a,b","X-Custom":"v"},"remoteEndpoint":{"address":"203.0.113.7","port":51234}}}' % (NS, NS))
    write("control_json", "accept-minimal", '{"accept":{"address":"ws://127.0.0.1:8080/$hc/hc1?sb-hc-action=accept&sb-hc-id=1","connectHeaders":{}}}')
    write("control_json", "accept-odd-values", '{"accept":{"address":"x","id":7,"connectHeaders":{"N":5,"A":[1,"\\u00e9"],"B":null},"remoteEndpoint":{"address":"::1","port":70000}}}')
    write("control_json", "renew-token", '{"renewToken":{"token":"%s"}}' % token(f"http://{NS}/hc1", "defaultListener", 1767225600))
    write("control_json", "request-http-mode", '{"request":{"address":"wss://ns/$hc/hc1?sb-hc-action=request&sb-hc-id=9","id":"9","requestTarget":"/hc1/sub?x=1","method":"POST","remoteEndpoint":{"address":"1.2.3.4","port":0},"requestHeaders":{"Content-Type":"text/plain","Via":"1.1 ns"},"body":true}}')
    write("control_json", "response", '{"response":{"requestId":"9","statusCode":"200","statusDescription":"OK","responseHeaders":{"content-type":"text/html"},"body":true}}')
    write("control_json", "request-rendezvous-only", '{"request":{"address":"wss://ns/$hc/hc1?sb-hc-action=request&sb-hc-id=9&sb-hc-rid=00ff","id":"9"}}')
    write("control_json", "request-inline-get", '{"request":{"address":"ws://127.0.0.1:1/$hc/hc1?sb-hc-action=request","id":"a","requestTarget":"/hc1","method":"GET","requestHeaders":{"Accept":"*/*","N":5,"L":["a","b"]},"body":false}}')
    write("control_json", "response-hyco-numbers", '{"response":{"requestId":"a","statusCode":204,"statusDescription":null,"responseHeaders":{"content-length":0,"x-list":["1",2]},"body":false}}')
    write("control_json", "response-bad-status", '{"response":{"requestId":"a","statusCode":"abc","body":true}}')
    write("control_json", "inject-fault", '{"injectFault":{}}')
    write("control_json", "two-keys", '{"a":1,"b":2}')
    write("control_json", "not-json", "nope")


def target_seeds():
    t = enc(token(f"http://{NS}/hc1", "defaultListener", 1767225600))
    for name, s in [
        ("listen-query-token", f"/$hc/hc1?sb-hc-action=listen&sb-hc-token={t}&sb-hc-id=abc"),
        ("connect-suffix-app-query", "/%24hc/My%20HC/api/v1/?a=b&SB-HC-ACTION=connect&flag&sb-hc-id=1"),
        ("accept", "/$hc/hc1?sb-hc-action=accept&sb-hc-id=4f1c&sb-hc-rid=Zm9vYmFy"),
        ("reject", "/$hc/hc1/sub?sb-hc-action=accept&sb-hc-id=1&sb-hc-rid=s3cr3t&sb-hc-statusCode=502&sb-hc-statusDescription=Endpoint+down%21"),
        ("request", "/$HC/hc1?sb-hc-action=request&sb-hc-id=9"),
        ("runtime-info", "/hc1?api-version=2016-07"),
        ("plain-form-encoded", "/hc1/sub%20dir?q=a+b&x=%E2%82%AC"),
        ("unknown-action", "/$hc/a?sb-hc-action=dance"),
        ("bad-encoding", "/$hc/%C3%28?sb-hc-id=%ff"),
        ("not-origin-form", "http://ns/$hc/hc1"),
        ("hcx-prefix", "/$hcx/a"),
        ("entity-with-dots", "/$hc/microsoft.hybridcompute/machines/x/v2?sb-hc-action=listen"),
    ]:
        write("hc_target", name, s)


def http_mode_seeds():
    for name, s in [
        ("target-token-and-app-query", "api\n/api/items/7?a=1&sb-hc-token=SharedAccessSignature%20sr%3Dx&b=%2f%3a&SB-HC-ID=1&flag"),
        ("target-nested-entity", "a/b\n/A/B/c/d?x"),
        ("target-encoded-entity", "my hc\n/my%20hc/x"),
        ("target-outside-entity", "hc1\n/other/x?sb-hc-action=listen"),
        ("target-absolute-form", "hc1\nhttp://ns/hc1/x"),
        ("reason-controls", "hc1\nMade\r\nSet-Cookie: x\tgr\u00fc\u00dfe"),
        ("response-headers", 'hc1\n{"response":{"requestId":"r","statusCode":200,"responseHeaders":{"Connection":"x-a, keep-alive","x-a":"1","Content-Length":"9","Transfer-Encoding":"chunked","Via":"1.0 app","ServiceBusAuthorization":"t","x-ok":["a","b"]},"body":true}}'),
        ("response-head", 'ns\n{"response":{"requestId":"r","statusCode":"204","responseHeaders":{"content-length":5},"body":false}}'),
    ]:
        write("http_mode", name, s)


# --- metadata ---------------------------------------------------------------------------

def metadata_seeds():
    desc = ('<HybridConnectionDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect" '
            'xmlns:i="http://www.w3.org/2001/XMLSchema-instance">'
            '<CreatedAt>2024-01-01T00:00:00Z</CreatedAt><UpdatedAt>2024-01-01T00:00:00Z</UpdatedAt>'
            '<RequiresClientAuthorization>true</RequiresClientAuthorization>'
            '<UserMetadata>[{&quot;key&quot;:&quot;endpoint&quot;,&quot;value&quot;:&quot;sqlhost.corp.local:1433&quot;}]</UserMetadata>'
            '<ListenerCount>1</ListenerCount></HybridConnectionDescription>')
    write("metadata", "atom-entry", f'<entry xmlns="http://www.w3.org/2005/Atom"><id>https://{NS}/hc1</id>'
          f'<title type="text">hc1</title><updated>2024-01-01T00:00:00Z</updated>'
          f'<content type="application/xml">{desc}</content></entry>')
    write("metadata", "prefixed-empty", "<a:HybridConnectionDescription><a:UserMetadata/><a:RequiresClientAuthorization> false </a:RequiresClientAuthorization><a:ListenerCount>2</a:ListenerCount></a:HybridConnectionDescription>")
    write("metadata", "numeric-entities", "<HybridConnectionDescription><UserMetadata>&#x5B;&#123;&quot;key&quot;:&quot;ENDPOINT&quot;,&quot;value&quot;:&quot;h:1&quot;}]</UserMetadata></HybridConnectionDescription>")
    write("metadata", "bad-entity", "<HybridConnectionDescription><CreatedAt>&bogus;</CreatedAt></HybridConnectionDescription>")
    write("metadata", "user-metadata-json", '[{"key":"other","value":"x"},{"key":"endpoint","value":"db.corp.local:5432"}]')
    write("metadata", "host-port", "sqlhost.corp.local:1433")
    write("metadata", "host-port-ipv6", "[::1]:80")
    write("metadata", "error-body", "<Error><Code>404</Code><Detail>Endpoint does not exist. TrackingId:1</Detail></Error>")


# --- config files -----------------------------------------------------------------------

def example_configs():
    """The repository's documented example configs (configs/*.toml), as they are."""
    d = os.path.join(os.path.dirname(ROOT), "..", "configs")
    for role in ("relay", "hcm", "bridge"):
        path = os.path.join(d, role + ".toml")
        if os.path.exists(path):
            with open(path, "rb") as f:
                write("config_" + role, "example-" + role + ".toml", f.read())


def config_seeds():
    example_configs()
    cs_listen = f"Endpoint=sb://{NS}/;SharedAccessKeyName=defaultListener;SharedAccessKey=REPLACE_WITH_KEY=;EntityPath=db"
    cs_send = cs_listen.replace("defaultListener", "defaultSender")
    write("config_relay", "full", """listen = "0.0.0.0:443"
data_dir = "/var/lib/hyrelay/relay"
public_url = "wss://relay.example.com"
hostnames = ["relay.example.com", "Relay.Internal"]
workers = 2

[tls]
mode = "files"
cert = "/etc/hyrelay/relay.crt"
key = "/etc/hyrelay/relay.key"
names = []

[listeners]
max_per_hybrid_connection = 25
balance = "least-loaded"
ping_interval = "30s"
token_grace = "5m"

[senders]
accept_timeout = "30s"

[limits]
handshake_timeout = "10s"
max_head_bytes = 16384
max_frame_bytes = 1048576
max_control_message_bytes = 65536
max_connections = 100000
max_connections_per_ip = 1000
max_unauthenticated = 2000
auth_failures_before_delay = 5
auth_failure_window = "60s"
auth_max_delay = "5s"
""")
    write("config_relay", "self-signed-dev", 'listen = "127.0.0.1:9443"\ndata_dir = "relay-data"\n[tls]\nmode = "self-signed"\nnames = ["relay.local"]\n')
    write("config_relay", "plain-behind-terminator", 'listen = "[::]:8080"\npublic_url = "ws://relay.local:8080"\ntls.mode = "none"\nlimits.max_frame_bytes = 1024\n')
    write("config_relay", "errors", 'workers = 0\n[tls]\nmode = "files"\n[listeners]\nping_interval = "0s"\nbalnce = "random"\n')
    write("config_hcm", "full", f"""data_dir = "/var/lib/hyrelay/hcm"
workers = 2
ca_files = ["/etc/hyrelay/ca.pem"]
dial_timeout = "10s"
relay_timeout = "20s"
token_ttl = "1h"
ping_interval = "30s"
allowed_endpoints = ["db.corp.local:5432", "*.lab.corp.local:*", "10.0.0.0/8:5432", "[fd00::/8]:*", "*:443"]

[[hybrid_connection]]
connection_string = "{cs_listen}"
endpoint = "db.corp.local:5432"

[[hybrid_connection]]
connection_string = "{cs_listen.replace('=db', '=web')}"
""")
    write("config_hcm", "duplicate-and-short-ttl", f'token_ttl = "30s"\n[[hybrid_connection]]\nconnection_string = "{cs_listen}"\n[[hybrid_connection]]\nconnection_string = "{cs_listen.replace("=db", "=DB")}"\n')
    write("config_hcm", "bad-allow-entries", 'allowed_endpoints = ["10.0.0.0/33:5432", "[fd00::/129]:*", "*.:0", "host", "::1:80"]\n')
    write("config_hcm", "no-entity-bad-endpoint", '[[hybrid_connection]]\nconnection_string = "Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey=b"\nendpoint = "db"\n')
    write("config_bridge", "full", f"""workers = 1
ca_files = []
hosts_file = "/etc/hosts"
connection_string = "{cs_send}"
relay_timeout = "40s"
ping_interval = "30s"

[[forward]]
hybrid_connection = "db"
listen = "127.0.0.1:15432"

[[forward]]
hybrid_connection = "db"
listen = "resolve"
""")
    write("config_bridge", "per-forward-strings", f'[[forward]]\nhybrid_connection = "web"\nlisten = "8080"\nconnection_string = "{cs_send.replace("=db", "=web")}"\n[[forward]]\nhybrid_connection = "api"\nlisten = "[::1]:9000"\nconnection_string = "Endpoint=ws://127.0.0.1:8080/;SharedAccessKeyName=s;SharedAccessKey=k"\n')
    write("config_bridge", "mismatch-and-empty", f'connection_string = "{cs_send}"\nrelay_timeout = "soon"\n[[forward]]\nhybrid_connection = "other"\nlisten = "1.2.3.4"\n')


# --- proxy answers to CONNECT -------------------------------------------------------------

def proxy_seeds():
    write("proxy_reply", "established", "HTTP/1.1 200 Connection established\r\n\r\n")
    write("proxy_reply", "squid-established", "HTTP/1.1 200 Connection established\r\nVia: 1.1 proxy (squid/5.7)\r\n\r\n")
    write("proxy_reply", "tinyproxy-407", 'HTTP/1.0 407 Proxy Authentication Required\r\nServer: tinyproxy/1.11.1\r\nContent-Type: text/html\r\nProxy-Authenticate: Basic realm="Tinyproxy"\r\nConnection: close\r\n\r\n')
    write("proxy_reply", "two-challenges", 'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Negotiate\r\nProxy-Authenticate: Basic realm="corp"\r\nContent-Length: 0\r\n\r\n')
    write("proxy_reply", "tinyproxy-403", "HTTP/1.1 403 Access violation\r\nServer: tinyproxy/1.11.1\r\nContent-Type: text/html\r\nConnection: close\r\n\r\n<?xml version=\"1.0\"?><html><body>denied</body></html>")
    write("proxy_reply", "interim-then-502", "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 502 Bad Gateway\r\n\r\n")
    write("proxy_reply", "early-bytes", "HTTP/1.1 200 OK\r\n\r\nSSH-2.0-OpenSSH_9.2\r\n")
    write("proxy_reply", "not-http", "SSH-2.0-OpenSSH_9.2\r\n")


def extension_seeds():
    write("extensions", "relay", "rendezvous-pool, early-data, head-timeout=10")
    write("extensions", "early-only", "early-data")
    write("extensions", "odd", "Early-Data , future-thing=3,head-timeout=x,,")
    write("extensions", "timeout-alone", "head-timeout=30")


# --- session rules (sans-IO) ---------------------------------------------------------------

def keepalive_seeds():
    import struct

    def ev(kind, ms):
        return bytes([kind]) + struct.pack("<H", ms)

    HEARD, TIMER, STOP = 0, 1, 2
    # period 30 ms (byte 29): a talking peer, pinged each period
    write("keepalive", "talking", bytes([29]) + b"".join(ev(HEARD, 10) + ev(TIMER, 20) for _ in range(8)))
    # a silent peer: timers until it is dead, then more timers
    write("keepalive", "silent", bytes([29]) + b"".join(ev(TIMER, 15) for _ in range(10)))
    # a driver late by many periods, then stopped
    write("keepalive", "late-then-stop", bytes([9]) + ev(HEARD, 5) + ev(TIMER, 65000) + ev(STOP, 1) + ev(TIMER, 100))
    # the shortest period, timers exactly on the boundaries
    write("keepalive", "boundaries", bytes([0]) + b"".join(ev(TIMER, 1) for _ in range(5)))


def dataplane_seeds():
    m = bytes([1, 2, 3, 4])
    # relay_forward: [limit, read size - 1, mode] then the sender's stream (mode 1: raw)
    raw = frame(2, b"hello", fin=False, mask=m) + frame(9, b"p", mask=m) + frame(0, b" world", mask=m)
    raw += frame(2, bytes(200), mask=m) + frame(8, struct.pack(">H", 1000), mask=m) + frame(2, b"after", mask=m)
    write("relay_forward", "stream-then-close", bytes([0, 6, 1]) + raw)
    write("relay_forward", "byte-by-byte", bytes([0, 0, 1]) + raw)
    write("relay_forward", "over-the-limit", bytes([1, 255, 1]) + frame(2, bytes(17), mask=m))
    write("relay_forward", "unmasked", bytes([0, 255, 1]) + frame(2, b"x"))
    write("relay_forward", "cut-mid-frame", bytes([0, 3, 1]) + frame(2, bytes(100), mask=m)[:40])
    # mode 0: groups of [opcode/FIN bits, length, fill]
    write("relay_forward", "described", bytes([3, 9, 0]) + bytes([0, 10, 65, 8, 5, 66, 2, 3, 67, 3, 0, 68, 5, 2, 3]))
    # splice: [limit, ws read size - 1] then [kind, arg] events
    RAW, FRAME, DATA, EOF, ERR, WS_EOF, STOP, POLL, WS_BROKEN, TCP_BROKEN = range(10)
    ev = lambda *e: bytes(e)
    write("splice", "clean", bytes([0, 4]) + ev(FRAME, 40, DATA, 7, FRAME, 1, POLL, 0, DATA, 9, EOF, 0, POLL, 0, FRAME, 3, POLL, 0))
    write("splice", "peer-closes-first", bytes([0, 255]) + ev(FRAME, 3, POLL, 0, DATA, 1, DATA, 2, POLL, 0, EOF, 0, POLL, 0))
    write("splice", "silent-peer", bytes([0, 8]) + ev(POLL, 20, POLL, 20, POLL, 20))
    write("splice", "stop", bytes([0, 8]) + ev(DATA, 5, POLL, 0, STOP, 0, DATA, 6, POLL, 0))
    write("splice", "raw-garbage", bytes([1, 0]) + ev(RAW, 0x82, RAW, 0x7f, RAW, 0xff, POLL, 0))
    write("splice", "broken-writes", bytes([0, 2]) + ev(FRAME, 20, DATA, 3, TCP_BROKEN, 0, POLL, 0, WS_BROKEN, 0, DATA, 4, POLL, 0))
    write("splice", "tcp-error", bytes([0, 2]) + ev(DATA, 3, ERR, 0, POLL, 0, FRAME, 8, WS_EOF, 0, POLL, 0))


def tls_record_seeds():
    # [scheme, bit to flip] then bytes that are both a received stream and a plaintext
    # (each record: a length/type byte, then that many bytes).
    write("tls_record", "tls13-aes", bytes([0, 3]) + bytes([5]) + b"hello" + bytes([1, 0]))
    write("tls_record", "tls13-chacha", bytes([1, 200]) + bytes([40]) + bytes(range(40)))
    write("tls_record", "tls12-gcm", bytes([2, 17]) + bytes([8]) + b"explicit" + bytes([2, 1, 0]))
    write("tls_record", "tls12-chacha", bytes([3, 255]) + bytes([255]) + bytes(255))
    write("tls_record", "header-like", bytes([0, 0]) + bytes([23, 3, 3, 0, 20]) + bytes(20))
    write("tls_record", "overlong", bytes([2, 0]) + bytes([23, 3, 3, 0x41, 0x01]))


if __name__ == "__main__":
    frame_seeds()
    mask_seeds()
    http_seeds()
    sas_seeds()
    connstr_seeds()
    control_seeds()
    target_seeds()
    http_mode_seeds()
    metadata_seeds()
    config_seeds()
    proxy_seeds()
    extension_seeds()
    keepalive_seeds()
    dataplane_seeds()
    tls_record_seeds()
