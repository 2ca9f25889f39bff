// A compiled gRPC client for benchmarks/grpc_load.py: it times Search (by vector) and an empty
// grpc.health.v1 Check against a running `embedstore serve`, one blocking call at a time, so the
// figures carry as little client-side cost as gRPC allows (C++ core, no Python on the client).
//
//   search_client TARGET COLLECTION QUERIES.f32 DIM SECONDS WARMUP_CALLS
//
// QUERIES.f32 holds n x DIM little-endian float32 query vectors. Prints one JSON object:
// {"health": {"calls": .., "seconds": .., "p50_ms": .., "p99_ms": ..}, "search": {...}}.
// Built by benchmarks/grpc_load.py (protoc + grpc_cpp_plugin + g++, see build_cpp_client there).
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include "embedstore/v1/store.grpc.pb.h"
#include "health_check.grpc.pb.h"

using Clock = std::chrono::steady_clock;

struct Stats {
  size_t calls;
  double seconds, p50_ms, p99_ms;
};

static double pct(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(q * (v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

// Calls `call` for `warmup` untimed rounds, then for `seconds`, timing each call.
static Stats timed(const std::function<bool(size_t)>& call, size_t warmup, double seconds) {
  for (size_t i = 0; i < warmup; ++i)
    if (!call(i)) std::exit(2);
  std::vector<double> lat;
  lat.reserve(200000);
  auto start = Clock::now();
  auto end = start + std::chrono::duration<double>(seconds);
  for (size_t i = 0;; ++i) {
    auto t0 = Clock::now();
    if (t0 >= end) break;
    if (!call(i)) std::exit(2);
    lat.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  return {lat.size(), elapsed, pct(lat, 0.5), pct(lat, 0.99)};
}

static void print(const char* name, const Stats& s, bool last) {
  std::printf("\"%s\": {\"calls\": %zu, \"seconds\": %.3f, \"p50_ms\": %.4f, \"p99_ms\": %.4f}%s", name, s.calls,
              s.seconds, s.p50_ms, s.p99_ms, last ? "" : ", ");
}

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s TARGET COLLECTION QUERIES.f32 DIM SECONDS WARMUP_CALLS\n", argv[0]);
    return 64;
  }
  const std::string target = argv[1], collection = argv[2], path = argv[3];
  const size_t dim = std::stoul(argv[4]);
  const double seconds = std::stod(argv[5]);
  const size_t warmup = std::stoul(argv[6]);

  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    return 66;
  }
  const size_t bytes = static_cast<size_t>(in.tellg());
  if (dim == 0 || bytes == 0 || bytes % (dim * sizeof(float)) != 0) {
    std::fprintf(stderr, "%s: %zu bytes is not a whole number of %zu-float rows\n", path.c_str(), bytes, dim);
    return 65;
  }
  std::vector<float> flat(bytes / sizeof(float));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(flat.data()), static_cast<std::streamsize>(bytes));

  // The requests are built beforehand, as the Python rows build theirs.
  std::vector<embedstore::v1::SearchRequest> requests(flat.size() / dim);
  for (size_t r = 0; r < requests.size(); ++r) {
    auto& q = requests[r];
    q.set_collection(collection);
    q.set_top_k(10);
    q.set_with_payload(true);
    auto* values = q.mutable_query()->mutable_vector()->mutable_values();
    values->Add(flat.begin() + r * dim, flat.begin() + (r + 1) * dim);
  }

  auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  auto store = embedstore::v1::StoreService::NewStub(channel);

  auto health_stub = grpc::health::v1::Health::NewStub(channel);
  const grpc::health::v1::HealthCheckRequest empty;  // service "": zero bytes on the wire

  auto health = [&](size_t) {
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckResponse resp;
    grpc::Status st = health_stub->Check(&ctx, empty, &resp);
    if (!st.ok()) std::fprintf(stderr, "Health/Check: %s\n", st.error_message().c_str());
    return st.ok();
  };
  auto search = [&](size_t i) {
    grpc::ClientContext ctx;
    embedstore::v1::SearchResponse resp;
    grpc::Status st = store->Search(&ctx, requests[i % requests.size()], &resp);
    if (!st.ok()) std::fprintf(stderr, "Search: %s\n", st.error_message().c_str());
    return st.ok() && resp.hits_size() > 0;
  };

  Stats h = timed(health, warmup, seconds);
  Stats s = timed(search, warmup, seconds);
  std::printf("{");
  print("health", h, false);
  print("search", s, true);
  std::printf("}\n");
  return 0;
}
