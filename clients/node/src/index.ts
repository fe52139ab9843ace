// A Node.js client for diffusiond on @grpc/grpc-js, loading the service from the .proto files at run time
// (@grpc/proto-loader), so there is no code generation step. Field names are lowerCamelCase, as in
// protobuf's JSON mapping; 64-bit integers (seeds) are strings, enums their names, bytes Buffers.
import * as fs from "node:fs";
import * as path from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

export const PROTO_FILE = "diffusiond/v1/diffusion.proto";

export type ImageFormat = "IMAGE_FORMAT_UNSPECIFIED" | "IMAGE_FORMAT_PNG" | "IMAGE_FORMAT_JPEG" | "IMAGE_FORMAT_WEBP";
export type PreviewKind =
  | "PREVIEW_KIND_UNSPECIFIED"
  | "PREVIEW_KIND_LATENT"
  | "PREVIEW_KIND_APPROX_RGB"
  | "PREVIEW_KIND_FULL"
  | "PREVIEW_KIND_TINY_DECODER";

/** A GenerateRequest; unset or zero fields select the model's defaults. */
export interface GenerateRequest {
  prompt: string;
  negativePrompt?: string;
  model?: string;
  width?: number;
  height?: number;
  steps?: number;
  guidanceScale?: number;
  seed?: string | number;
  numImages?: number;
  scheduler?: string;
  outputFormat?: ImageFormat;
  quality?: number;
  preview?: { kind?: PreviewKind; everyNSteps?: number; maxSize?: number };
  requestId?: string;
}

export interface Image {
  data: Buffer;
  mimeType: string;
  width: number;
  height: number;
  seed: string;
  index: number;
}

export interface GenerateResponse {
  requestId: string;
  images: Image[];
  seed: string;
  model: string;
  backend: string;
  scheduler: string;
  steps: number;
  guidanceScale: number;
  timings: { queueS: number; textEncodeS: number; denoiseS: number; decodeS: number; totalS: number };
  warnings: string[];
  fromCache: boolean;
}

export interface Step {
  step: number;
  totalSteps: number;
  timestep: number;
  elapsedS: number;
  etaS: number;
  previews: Image[];
  latents: { shape: string[]; dtype: string; data: Buffer } | null;
}

/** One StreamProgress event; `event` names the one field that is set. */
export interface ProgressEvent {
  requestId: string;
  event: "queued" | "started" | "step" | "result";
  queued?: { position: number };
  started?: { model: string; backend: string; totalSteps: number; seed: string; width: number; height: number; scheduler: string };
  step?: Step;
  result?: GenerateResponse;
}

export interface ModelInfo {
  name: string;
  backend: string;
  source: string;
  device: string;
  dtype: string;
  defaultWidth: number;
  defaultHeight: number;
  defaultSteps: number;
  defaultGuidanceScale: number;
  defaultScheduler: string;
  schedulers: string[];
  minSize: number;
  maxSize: number;
  sizeMultiple: number;
  maxSteps: number;
  maxImages: number;
  isDefault: boolean;
  /** The preview kinds the model serves, the best live preview first (empty from older servers). */
  previewKinds: PreviewKind[];
}

export interface ClientOptions {
  /** Bearer token for a server started with --auth-tokens. */
  token?: string;
  /** TLS credentials (grpc.credentials.createSsl(...)); default: plaintext. */
  credentials?: grpc.ChannelCredentials;
  /** Directory holding diffusiond/v1/diffusion.proto (default: DIFFUSIOND_PROTO_DIR, the package's copy, the repo's). */
  protoDir?: string;
  /** Default deadline of every call, in milliseconds (default: none). */
  timeoutMs?: number;
  /** Tries of a call answered UNAVAILABLE (a server loading or draining), 1 to 5; 1: no retries. Default 5. */
  maxAttempts?: number;
}

export interface CallOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** A failed call: `code` is the gRPC status code, `codeName` its name (e.g. "INVALID_ARGUMENT"). */
export class DiffusionError extends Error {
  constructor(
    readonly code: grpc.status,
    readonly details: string,
  ) {
    super(`${grpc.status[code]}: ${details}`);
    this.name = "DiffusionError";
  }

  get codeName(): string {
    return grpc.status[this.code];
  }

  static from(error: unknown): DiffusionError {
    const e = error as Partial<grpc.ServiceError>;
    return e instanceof DiffusionError ? e : new DiffusionError(e.code ?? grpc.status.UNKNOWN, e.details ?? String(error));
  }
}

function findProtoDir(explicit?: string): string {
  const candidates = [
    explicit,
    process.env.DIFFUSIOND_PROTO_DIR,
    path.resolve(__dirname, "..", "..", "protos"), // the copy `npm pack` puts in the package
    path.resolve(__dirname, "..", "..", "..", "..", "protos"), // clients/node/dist/src -> the repository's
  ];
  for (const dir of candidates) {
    if (dir && fs.existsSync(path.join(dir, PROTO_FILE))) return dir;
  }
  throw new Error(`cannot find ${PROTO_FILE}; pass protoDir or set DIFFUSIOND_PROTO_DIR`);
}

/** The same retry policy as the Python client: UNAVAILABLE is retried with exponential backoff. */
function serviceConfig(maxAttempts: number): string {
  const method: Record<string, unknown> = { name: [{ service: "diffusiond.v1.Diffusion" }] };
  if (maxAttempts > 1) {
    method.retryPolicy = {
      maxAttempts: Math.min(maxAttempts, 5),
      initialBackoff: "0.5s",
      maxBackoff: "4s",
      backoffMultiplier: 2,
      retryableStatusCodes: ["UNAVAILABLE"],
    };
  }
  return JSON.stringify({ methodConfig: [method] });
}

type Stub = grpc.Client & Record<string, (...args: unknown[]) => unknown>;

export class DiffusionClient {
  private readonly stub: Stub;
  private readonly metadata: grpc.Metadata;
  private readonly timeoutMs?: number;

  constructor(address: string, options: ClientOptions = {}) {
    const definition = protoLoader.loadSync(PROTO_FILE, {
      includeDirs: [findProtoDir(options.protoDir)],
      keepCase: false,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    const api = grpc.loadPackageDefinition(definition) as unknown as {
      diffusiond: { v1: { Diffusion: grpc.ServiceClientConstructor } };
    };
    const channelOptions = {
      "grpc.service_config": serviceConfig(options.maxAttempts ?? 5),
      "grpc.max_receive_message_length": 256 * 1024 * 1024,
    };
    this.stub = new api.diffusiond.v1.Diffusion(
      address,
      options.credentials ?? grpc.credentials.createInsecure(),
      channelOptions,
    ) as unknown as Stub;
    this.metadata = new grpc.Metadata();
    if (options.token) this.metadata.set("authorization", `Bearer ${options.token}`);
    this.timeoutMs = options.timeoutMs;
  }

  private callOptions(options?: CallOptions): grpc.CallOptions {
    const timeout = options?.timeoutMs ?? this.timeoutMs;
    return timeout === undefined ? {} : { deadline: Date.now() + timeout };
  }

  private unary<T>(method: string, request: object, options?: CallOptions): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const call = this.stub[method](request, this.metadata, this.callOptions(options), (error: unknown, response: T) =>
        error ? reject(DiffusionError.from(error)) : resolve(response),
      ) as grpc.ClientUnaryCall;
      options?.signal?.addEventListener("abort", () => call.cancel(), { once: true });
    });
  }

  /** The finished images. */
  generate(request: GenerateRequest, options?: CallOptions): Promise<GenerateResponse> {
    return this.unary<GenerateResponse>("Generate", request, options);
  }

  /** Queue position, start, every step (with previews when asked) and the result; leaving the loop early
   * cancels the call, which stops the server's work at its next step. */
  async *stream(request: GenerateRequest, options?: CallOptions): AsyncGenerator<ProgressEvent> {
    const call = this.stub.StreamProgress(request, this.metadata, this.callOptions(options)) as grpc.ClientReadableStream<ProgressEvent>;
    options?.signal?.addEventListener("abort", () => call.cancel(), { once: true });
    try {
      for await (const event of call) yield event as ProgressEvent;
    } catch (error) {
      throw DiffusionError.from(error);
    } finally {
      call.cancel();
    }
  }

  /** The models the server has loaded. */
  async listModels(options?: CallOptions): Promise<ModelInfo[]> {
    const response = await this.unary<{ models: ModelInfo[] }>("ListModels", {}, options);
    return response.models;
  }

  close(): void {
    this.stub.close();
  }
}
