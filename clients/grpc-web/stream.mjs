#!/usr/bin/env node
// Call StreamPredict over grpc-web, as a browser app does, and print each token as it
// arrives: one JSON line per message on stdout, each with "t", the wall-clock time it
// arrived (milliseconds since the epoch, fractional).
//
//   node stream.mjs ENVOY_URL PROMPT [--max-tokens N] [--cancel-after N]
//                   [--api-key KEY] [--request-id ID] [--model ID] [--temperature T]
//                   [--timeout-ms MS] [--http-version 1.1|2]
//
//   {"t":...,"type":"token","index":0,"token":"Hello"}             one per token message
//   {"t":...,"type":"final","finish_reason":"FINISH_REASON_LENGTH",
//    "usage":{"prompt_tokens":5,"completion_tokens":16},"tokens":16}   the last message
//   {"t":...,"type":"cancelled","after_tokens":3}     --cancel-after N: aborted after N
//                                                     token messages (exit status 0)
//   {"t":...,"type":"error","code":16,"code_name":"UNAUTHENTICATED","message":"..."}
//
// On an error the exit status is the gRPC status code (1 to 16), the error line goes to
// stdout and a readable one to stderr; a usage error exits with 2 before any call.
// The transport is @connectrpc/connect-node's grpc-web transport (the wire protocol
// of @connectrpc/connect-web's in a browser), over HTTP/1.1 by default as a browser
// uses it without TLS; Envoy (deploy/envoy.yaml's grpc_web filter) turns it into gRPC.
// The code in gen/ is generated from protos/ by scripts/gen_web_protos.sh.
import { parseArgs } from "node:util";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-node";
import {
  FinishReasonSchema,
  InferenceService,
  PredictRequestSchema,
} from "./gen/inference/v1/inference_pb.js";

const USAGE =
  "usage: node stream.mjs ENVOY_URL PROMPT [--max-tokens N] [--cancel-after N] " +
  "[--api-key KEY] [--request-id ID] [--model ID] [--temperature T] " +
  "[--timeout-ms MS] [--http-version 1.1|2]";

// gRPC's names of the status codes, by number (connect's Code enum spells them in
// camel case, and Canceled with one l).
const GRPC_CODE_NAMES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
  "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
  "UNAUTHENTICATED",
];

function now() {
  return performance.timeOrigin + performance.now();
}

function emit(record) {
  process.stdout.write(JSON.stringify({ t: now(), ...record }) + "\n");
}

function usageError(message) {
  process.stderr.write(`stream.mjs: ${message}\n${USAGE}\n`);
  process.exit(2);
}

function integer(name, text, minimum) {
  if (text === undefined) return undefined;
  const value = Number(text);
  if (!Number.isInteger(value) || value < minimum) {
    usageError(`--${name} must be an integer >= ${minimum}, got ${JSON.stringify(text)}`);
  }
  return value;
}

function parse() {
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: {
        "max-tokens": { type: "string", default: "64" },
        "cancel-after": { type: "string" },
        "api-key": { type: "string" },
        "request-id": { type: "string", default: "" },
        model: { type: "string", default: "" },
        temperature: { type: "string", default: "0" },
        "timeout-ms": { type: "string" },
        "http-version": { type: "string", default: "1.1" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (error) {
    usageError(error.message);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    process.stdout.write(USAGE + "\n");
    process.exit(0);
  }
  if (positionals.length !== 2) usageError("expected ENVOY_URL and PROMPT");
  const [url, prompt] = positionals;
  if (!/^https?:\/\//.test(url)) usageError(`ENVOY_URL must be http(s)://..., got ${url}`);
  if (!["1.1", "2"].includes(values["http-version"])) usageError("--http-version is 1.1 or 2");
  const temperature = Number(values.temperature);
  if (!Number.isFinite(temperature) || temperature < 0) usageError("--temperature must be >= 0");
  return {
    url,
    prompt,
    maxTokens: integer("max-tokens", values["max-tokens"], 0),
    cancelAfter: integer("cancel-after", values["cancel-after"], 1),
    apiKey: values["api-key"],
    requestId: values["request-id"],
    model: values.model,
    temperature,
    timeoutMs: integer("timeout-ms", values["timeout-ms"], 1),
    httpVersion: values["http-version"],
  };
}

function finishReasonName(number) {
  return FinishReasonSchema.values.find((v) => v.number === number)?.name ?? String(number);
}

async function main() {
  const args = parse();
  const transport = createGrpcWebTransport({
    baseUrl: args.url,
    httpVersion: args.httpVersion,
  });
  const client = createClient(InferenceService, transport);
  const request = create(PredictRequestSchema, {
    modelId: args.model,
    requestId: args.requestId,
    features: { prompt: { value: { case: "stringValue", value: args.prompt } } },
    config: { maxTokens: args.maxTokens, temperature: args.temperature },
  });
  const headers = new Headers();
  if (args.apiKey !== undefined) headers.set("authorization", `Bearer ${args.apiKey}`);
  const abort = new AbortController();
  let received = 0;
  try {
    for await (const message of client.streamPredict(request, {
      headers,
      signal: abort.signal,
      timeoutMs: args.timeoutMs,
    })) {
      if (message.isFinal) {
        emit({
          type: "final",
          finish_reason: finishReasonName(message.finishReason),
          usage: {
            prompt_tokens: message.usage?.promptTokens ?? 0,
            completion_tokens: message.usage?.completionTokens ?? 0,
          },
          tokens: message.tokenIndex,
        });
        continue;
      }
      emit({ type: "token", index: message.tokenIndex, token: message.token });
      received += 1;
      if (args.cancelAfter !== undefined && received >= args.cancelAfter) {
        // As a browser app's Stop button: the request is aborted, the connection
        // (HTTP/1.1) or stream (HTTP/2) to Envoy goes away, Envoy resets the upstream
        // stream and the server cancels the generation.
        abort.abort();
      }
    }
  } catch (error) {
    const failure = ConnectError.from(error);
    if (abort.signal.aborted && failure.code === Code.Canceled) {
      emit({ type: "cancelled", after_tokens: received });
      return 0;
    }
    const codeName = GRPC_CODE_NAMES[failure.code] ?? String(failure.code);
    emit({ type: "error", code: failure.code, code_name: codeName, message: failure.rawMessage });
    process.stderr.write(`stream.mjs: ${codeName} (${failure.code}): ${failure.rawMessage}\n`);
    return failure.code;
  }
  return 0;
}

// Exit at once: an idle keep-alive connection must not keep the process waiting.
process.exit(await main());
