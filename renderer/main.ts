import { mount } from 'svelte';
import App from './App.svelte';
import { AppState } from './lib/app-state.svelte.ts';
import './app.css';

const app = new AppState();
mount(App, { target: document.getElementById('app')!, props: { app } });
void app.start();
