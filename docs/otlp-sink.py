"""An OTLP/HTTP receiver that accepts every trace export and keeps nothing, to measure what
exporting costs Tern without a collector's own cost (docs/performance.md):

    python3 docs/otlp-sink.py 4318 &
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 tern bench --metrics ...

It prints how many exports and bytes it received when stopped (Ctrl-C or SIGTERM).
"""
import http.server
import signal
import sys

received = {"exports": 0, "bytes": 0}


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        self.rfile.read(length)
        received["exports"] += 1
        received["bytes"] += length
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 4318
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Sink)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    print(f"otlp-sink: {received['exports']} exports, {received['bytes']} bytes", file=sys.stderr)
