#!/usr/bin/env node
// Entry for the `chorus` command: load the TypeScript sources through tsx, then run the CLI.
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../chorus.ts');
process.exitCode = await main(process.argv.slice(2));
