/**
 * The engine host's lifecycle: a utility process running `engine-host.js`, reached over a
 * MessagePort. If it dies, pending calls get a typed error and the next call starts a new one.
 */
import { MessageChannelMain, utilityProcess, type UtilityProcess } from 'electron';
import { PortClient, type PortLike } from './port-protocol.ts';
import type { EngineInit } from './engine-host.ts';

export class EngineProcess {
  #child: UtilityProcess | undefined;
  #client: PortClient | undefined;
  readonly #listeners = new Set<Parameters<PortClient['onEvent']>[0]>();
  readonly #entry: string;
  readonly #init: EngineInit;

  constructor(entry: string, init: EngineInit) {
    this.#entry = entry;
    this.#init = init;
  }

  client(): PortClient {
    if (this.#client !== undefined) return this.#client;
    const { port1, port2 } = new MessageChannelMain();
    const child = utilityProcess.fork(this.#entry, [], { serviceName: 'Chorus engine', stdio: 'inherit' });
    const wrapped: PortLike = { onMessage: (l) => port1.on('message', (e) => l(e.data)), postMessage: (d) => port1.postMessage(d) };
    const client = new PortClient(wrapped);
    for (const l of this.#listeners) client.onEvent(l);
    port1.start();
    child.postMessage(this.#init, [port2]);
    child.on('exit', (code) => {
      client.failPending(`the engine process stopped (exit code ${code}); the next action restarts it.`);
      if (this.#child === child) {
        this.#child = undefined;
        this.#client = undefined;
      }
    });
    this.#child = child;
    this.#client = client;
    return client;
  }

  onEvent(listener: Parameters<PortClient['onEvent']>[0]): void {
    this.#listeners.add(listener);
    this.#client?.onEvent(listener);
  }

  dispose(): void {
    this.#child?.kill();
    this.#child = undefined;
    this.#client = undefined;
  }
}
