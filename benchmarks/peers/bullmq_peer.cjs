// Node BullMQ (npm bullmq 6.7.0 with ioredis 5.9.3; NODE_PATH points at its node_modules):
// addBulk in chunks of 1,000, a Worker with concurrency 128; completed jobs kept (the default).
// The same line protocol as proto.py (times in ns since the epoch).
"use strict";
const readline = require("node:readline");
const { Queue, Worker } = require("bullmq");
const IORedis = require("ioredis");

const NAME = "bench", CHUNK = 1000, CONCURRENCY = 128;
const [role, url, expectArg] = process.argv.slice(2);
const expect = Number(expectArg || 0);
const nowNs = () => Math.round((performance.timeOrigin + performance.now()) * 1e6);
const say = (...parts) => process.stdout.write(parts.join(" ") + "\n");
const connect = () => new IORedis(url, { maxRetriesPerRequest: null });

async function producer() {
  const queue = new Queue(NAME, { connection: connect() });
  await queue.waitUntilReady();
  say("ready");
  for await (const line of readline.createInterface({ input: process.stdin })) {
    const cmd = line.trim().split(/\s+/);
    if (cmd[0] === "probe") {
      const t0 = nowNs();
      const job = await queue.add("noop", {});
      say("sent", job.id, t0);
    } else if (cmd[0] === "bulk") {
      const n = Number(cmd[1]), t0 = nowNs();
      for (let start = 0; start < n; start += CHUNK) {
        const size = Math.min(CHUNK, n - start);
        await queue.addBulk(Array.from({ length: size }, () => ({ name: "noop", data: {} })));
      }
      say("bulked", n, t0, nowNs());
    }
  }
  await queue.close();
}

async function consumer() {
  let done = 0, first = 0;
  const worker = new Worker(
    NAME,
    async (job) => {
      if (!expect) say("start", job.id, nowNs());
      else if (!first) first = nowNs();
    },
    { connection: connect(), concurrency: CONCURRENCY },
  );
  worker.on("completed", () => {
    done += 1;
    if (expect && done === expect) say("drained", first, nowNs());
  });
  await worker.waitUntilReady();
  say("ready");
  for await (const _ of readline.createInterface({ input: process.stdin })) {
    // nothing to read: the parent closes stdin to stop us
  }
  await worker.close();
}

(role === "producer" ? producer() : consumer()).then(
  () => process.exit(0),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
