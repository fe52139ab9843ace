// The Node client against a live diffusiond server: DIFFUSIOND_ADDRESS (host:port) and, for a server with
// --auth-tokens, DIFFUSIOND_TOKEN. tests/test_node_client.py starts the server and runs `npm test`;
// DIFFUSIOND_OUT, when set, receives generated.png for the Python side to compare byte for byte.
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { after, test } from "node:test";

import * as grpc from "@grpc/grpc-js";

import { DiffusionClient, DiffusionError, ProgressEvent } from "../src";

const address = process.env.DIFFUSIOND_ADDRESS;
if (!address) throw new Error("set DIFFUSIOND_ADDRESS to a running server's host:port (see tests/test_node_client.py)");
const token = process.env.DIFFUSIOND_TOKEN;
const client = new DiffusionClient(address, { token, timeoutMs: 120_000 });
after(() => client.close());

const PNG = Buffer.from([0x89, 0x50, 0x4e, 0x47]);
const JPEG = Buffer.from([0xff, 0xd8, 0xff]);

test("lists the loaded models", async () => {
  const models = await client.listModels();
  assert.equal(models.length, 1);
  assert.equal(models[0].name, "builtin");
  assert.equal(models[0].isDefault, true);
  assert.equal(models[0].defaultWidth, 64);
  assert.ok(models[0].schedulers.includes("euler"));
  assert.equal(models[0].previewKinds[0], "PREVIEW_KIND_APPROX_RGB"); // no tiny decoder: the projection first
});

test("generates a PNG with its seed", async () => {
  const response = await client.generate({
    prompt: "a large red circle on a blue background, top left",
    steps: 4,
    seed: "21",
    numImages: 2,
    scheduler: "euler",
  });
  assert.equal(response.images.length, 2);
  assert.deepEqual(response.images.map((i) => i.seed), ["21", "22"]);
  for (const image of response.images) {
    assert.equal(image.mimeType, "image/png");
    assert.ok(image.data.subarray(0, 4).equals(PNG));
    assert.equal(image.width, 64);
  }
  if (process.env.DIFFUSIOND_OUT) fs.writeFileSync(path.join(process.env.DIFFUSIOND_OUT, "generated.png"), response.images[0].data);
});

test("streams queue, start, every step with a preview, and the result", async () => {
  const events: ProgressEvent[] = [];
  for await (const event of client.stream({
    prompt: "a small green square on a black background",
    steps: 5,
    seed: "3",
    preview: { kind: "PREVIEW_KIND_APPROX_RGB", everyNSteps: 1 },
  })) {
    events.push(event);
  }
  assert.deepEqual(events.map((e) => e.event), ["queued", "started", "step", "step", "step", "step", "step", "result"]);
  const steps = events.filter((e) => e.event === "step").map((e) => e.step!);
  assert.deepEqual(steps.map((s) => s.step), [1, 2, 3, 4, 5]);
  for (const step of steps) assert.ok(step.previews[0].data.subarray(0, 3).equals(JPEG));
  assert.equal(events.at(-1)!.result!.seed, "3");
});

test("leaving a stream early cancels it", async () => {
  let seen = 0;
  for await (const event of client.stream({ prompt: "a fox", steps: 50 })) {
    if (event.event === "step" && ++seen === 2) break;
  }
  assert.equal(seen, 2);
  const after = await client.generate({ prompt: "after", steps: 1 }); // the server is free again
  assert.equal(after.images.length, 1);
});

test("errors carry the gRPC status", async () => {
  await assert.rejects(client.generate({ prompt: "a fox", steps: 5000 }), (error: DiffusionError) => {
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.match(error.details, /^steps: must be between 1 and/);
    return true;
  });
  await assert.rejects(client.generate({ prompt: "a fox", model: "nope" }), { codeName: "NOT_FOUND" });
});

test("a server with tokens refuses a client without one", { skip: !token && "the server has no tokens" }, async () => {
  const anonymous = new DiffusionClient(address, { timeoutMs: 30_000 });
  try {
    await assert.rejects(anonymous.listModels(), { codeName: "UNAUTHENTICATED" });
  } finally {
    anonymous.close();
  }
});
