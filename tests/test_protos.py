"""The committed generated gRPC code is exactly what grpcio-tools makes from protos/ now."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generate_module():
    spec = importlib.util.spec_from_file_location("protos_generate", ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_committed_generated_code_is_fresh():
    gen = _generate_module()
    assert gen.protos(), "no .proto files found"
    assert gen.check() == []


def test_check_catches_a_stale_file(tmp_path, monkeypatch):
    gen = _generate_module()
    copy = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", copy)
    monkeypatch.setattr(gen, "ROOT", copy)
    monkeypatch.setattr(gen, "PACKAGE", copy / "embedstore" / "v1")
    target = copy / "embedstore" / "v1" / "store.proto"
    target.write_text(target.read_text().replace("bool with_payload = 6;", "bool with_payload = 6;\n  bool extra = 7;"))
    assert "stale: store_pb2.py" in gen.check()


def test_generated_modules_import_and_carry_the_services():
    from embedstore.v1 import embedding_pb2, labeling_pb2, store_pb2

    assert set(embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].methods_by_name) == {
        "Embed",
        "EmbedStream",
        "Info",
    }
    assert set(store_pb2.DESCRIPTOR.services_by_name["StoreService"].methods_by_name) == {
        "Upsert",
        "Search",
        "Get",
        "Delete",
        "Count",
    }
    assert "InspectNeighbours" in labeling_pb2.DESCRIPTOR.services_by_name["LabelingService"].methods_by_name
