#!/usr/bin/env node
// Stream a generation from the tierserve router: every token with its latency, then the summary.
//
//   npm ci
//   node client.js [--address 127.0.0.1:50051] [--max-new-tokens 16] [--tier bf16] "The capital of France is"
//   node client.js --chat [--system "Answer briefly."] "What is the capital of France?"
//
// With --chat (or --system) the text is a user message, which the worker renders with the model's
// chat template; without it, a prompt the model continues as it is.
//
// The stubs are built at run time from the proto files (protos/tierserve/v1), so this client always
// speaks the contract checked in beside it.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = process.env.TIERSERVE_PROTO_ROOT || path.join(__dirname, '..', '..', 'protos');

function loadRouter() {
  const definition = protoLoader.loadSync('tierserve/v1/router.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the proto: latency_us, worker_id
    longs: Number, // int64 microseconds fit a double for any realistic latency
    enums: String,
    defaults: true,
    oneofs: true, // GenerateResponse.kind says "token" or "summary"
  });
  return grpc.loadPackageDefinition(definition).tierserve.v1.Router;
}

function parse(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      address: { type: 'string', default: process.env.TIERSERVE_ADDRESS || '127.0.0.1:50051' },
      'max-new-tokens': { type: 'string' },
      tier: { type: 'string', default: '' },
      'max-token-latency-ms': { type: 'string', default: '0' },
      'timeout-s': { type: 'string', default: '120' },
      chat: { type: 'boolean', default: false },
      system: { type: 'string' },
    },
  });
  const text = positionals.join(' ');
  const request = {
    tier: values.tier,
    max_token_latency_ms: Number(values['max-token-latency-ms']),
  };
  if (values.chat || values.system !== undefined) {
    // A conversation: an optional system message, then the user's.
    request.messages = [];
    if (values.system) request.messages.push({ role: 'system', content: values.system });
    request.messages.push({ role: 'user', content: text || 'What is the capital of France?' });
  } else {
    request.prompt = text || 'The capital of France is';
  }
  if (values['max-new-tokens'] !== undefined) request.max_new_tokens = Number(values['max-new-tokens']);
  return { address: values.address, request, timeoutS: Number(values['timeout-s']) };
}

function main() {
  const { address, request, timeoutS } = parse(process.argv.slice(2));
  const Router = loadRouter();
  const client = new Router(address, grpc.credentials.createInsecure());
  const deadline = new Date(Date.now() + timeoutS * 1000);
  const call = client.Generate(request, { deadline });
  let summary = null;

  call.on('data', (response) => {
    if (response.kind === 'token') {
      const { index, latency_us: latencyUs, text } = response.token;
      console.log(`${String(index).padStart(4)}  ${(latencyUs / 1000).toFixed(1).padStart(8)} ms  ${JSON.stringify(text)}`);
    } else {
      summary = response.summary;
    }
  });
  call.on('error', (error) => {
    const code = Object.keys(grpc.status).find((name) => grpc.status[name] === error.code) || error.code;
    console.error(`error: ${code}: ${error.details}`);
    client.close();
    process.exitCode = 1;
  });
  call.on('end', () => {
    client.close();
    if (summary === null) {
      console.error('error: the stream ended without a summary');
      process.exitCode = 1;
      return;
    }
    if (request.messages) {
      for (const { role, content } of request.messages) console.log(`${role}: ${content}`);
      console.log(`assistant: ${summary.text}`);
    } else {
      console.log(`text: ${request.prompt}${summary.text}`);
    }
    console.log(
      `summary: worker ${summary.worker_id} (${summary.tier}), ${summary.generated_tokens} tokens, ` +
        `TTFT ${(summary.ttft_us / 1000).toFixed(1)} ms, TPOT mean ${(summary.tpot_mean_us / 1000).toFixed(1)} ms, ` +
        `budget met ${summary.budget_met}, finish ${summary.finish_reason}`,
    );
    console.log(`routing: ${summary.routing_reason}`);
  });
}

main();
