"""An OTLP/gRPC logs receiver built on the OpenTelemetry project's own
generated Python code (opentelemetry-proto, grpcio): what the audit export
test sends to. Prints `PORT n`, then one JSON object per received log
record (the record as protobuf JSON, with its resource and scope). The
first N calls (argv[1]) are refused with UNAVAILABLE, to test retries."""

import json
import sys
from concurrent import futures

import grpc
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc


class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, refuse):
        self.refuse = refuse

    def Export(self, request, context):
        if self.refuse > 0:
            self.refuse -= 1
            print(json.dumps({"refused": True}), flush=True)
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        for rl in request.resource_logs:
            resource = MessageToDict(rl.resource)
            for sl in rl.scope_logs:
                for lr in sl.log_records:
                    out = MessageToDict(lr)
                    out["resource"] = resource
                    out["scope"] = sl.scope.name
                    print(json.dumps(out), flush=True)
        return logs_service_pb2.ExportLogsServiceResponse()


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(int(sys.argv[1])), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORT {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
