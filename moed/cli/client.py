"""moectl's connection to the daemon: target, credentials, admin metadata, stubs."""
import os

import grpc

from moed.server.gen import admin_pb2_grpc, generation_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


class Client:
    def __init__(self, target=None, token=None, ca_file=None):
        self.target = target or os.environ.get("MOED_TARGET") or DEFAULT_TARGET
        self.token = token or os.environ.get("MOED_ADMIN_TOKEN")
        self.ca_file = ca_file

    def channel(self, aio=False):
        mod = grpc.aio if aio else grpc
        if self.ca_file:
            with open(self.ca_file, "rb") as fh:
                creds = grpc.ssl_channel_credentials(root_certificates=fh.read())
            return mod.secure_channel(self.target, creds)
        return mod.insecure_channel(self.target)

    def admin_metadata(self):
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    @staticmethod
    def generation(channel):
        return generation_pb2_grpc.GenerationServiceStub(channel)

    @staticmethod
    def admin(channel):
        return admin_pb2_grpc.AdminServiceStub(channel)
