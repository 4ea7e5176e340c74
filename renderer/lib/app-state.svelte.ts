/**
 * The app's state and actions (Svelte 5 runes). Components render it; every backend call goes
 * through the typed API object. The logic lives in the pure modules beside this file
 * (stack-model, region-geometry, prompt-tokens, job-settings); this file only holds state and wires.
 */
import type { ApiError, ApiEvent, AppInfo, BatchQueueView, GalleryItem, JobPayload, JobSummary, LoadedSettings, LoraCard, ModelScan, ModelStatus, Settings } from '../../pipelines/api/contract.ts';
import { asApiError, createApi, type ChorusApi } from './api.ts';
import { defaultForm, formFromPayload, formPayload, randomSeed, type GenerationForm } from './job-settings.ts';
import { compositionPayload, conceptsFromJob } from './concept-payload.ts';
import { pruneConcepts, toggleConceptWord, type ConceptMap } from './prompt-tokens.ts';
import { nextColor, refitRegions, regionWarnings, regionsPayload, type Box, type Region } from './region-geometry.ts';
import { addEntry, entryFromCard, moveBefore, newKey, removeEntry, setEnabled, setSplit, setWeight, type StackEntry } from './stack-model.ts';

export type Screen = 'create' | 'models' | 'gallery' | 'compare' | 'queue';
export type RegionTool = 'select' | 'box' | 'mask' | 'erase';

export interface CompareCell {
  readonly label: string;
  jobId: string | null;
  file: string | null;
  thumb: string | null;
  error: ApiError | null;
  fraction: number;
}

export class AppState {
  readonly api: ChorusApi;
  screen = $state<Screen>('create');
  info = $state.raw<AppInfo | null>(null);
  settings = $state.raw<Settings | null>(null);
  /** The last error of each area, shown where it happened. */
  errors = $state<Record<string, ApiError | null>>({});
  notice = $state<string | null>(null);

  // models
  model = $state.raw<ModelStatus | null>(null);
  modelScan = $state.raw<ModelScan | null>(null);
  modelsDir = $state('');
  opening = $state(false);

  // LoRA library
  loras = $state.raw<readonly LoraCard[]>([]);
  previews = $state<Record<string, string | null>>({});
  search = $state('');
  baseFilter = $state<'all' | 'sd1' | 'other' | 'problems'>('all');

  // create
  form = $state<GenerationForm>(defaultForm());
  stack = $state<StackEntry[]>([]);
  concepts = $state.raw<ConceptMap>({});
  conceptOwner = $state<string | null>(null);
  regions = $state<Region[]>([]);
  selectedRegion = $state<string | null>(null);
  regionTool = $state<RegionTool>('box');
  brushPx = $state(32);
  /** Mask images per mask region, PNG base64, set by the region canvas. */
  masks = $state.raw<Record<string, string>>({});
  /** What each mask looks like on the canvas (a data URL), to redraw it after a screen switch. */
  maskViews = $state.raw<Record<string, string>>({});

  // current job
  jobId = $state<string | null>(null);
  job = $state.raw<JobSummary | null>(null);
  step = $state(0);
  steps = $state(0);
  fraction = $state(0);
  preview = $state.raw<string | null>(null);
  lastImage = $state.raw<string | null>(null);
  lastSeed = $state<string | null>(null);

  // gallery
  gallery = $state.raw<readonly GalleryItem[]>([]);
  thumbs = $state<Record<string, string>>({});
  selectedImage = $state<string | null>(null);
  fullImage = $state.raw<string | null>(null);
  loaded = $state.raw<LoadedSettings | null>(null);

  // compare and queue
  compareMode = $state<'strategies' | 'weights'>('strategies');
  compareStrategies = $state<string[]>(['plain', 'merge']);
  compareLora = $state<string | null>(null);
  compareWeights = $state('0, 0.5, 1');
  compareCells = $state<CompareCell[]>([]);
  jobs = $state.raw<readonly JobSummary[]>([]);
  batchQueue = $state.raw<BatchQueueView | null>(null);

  readonly filteredLoras = $derived.by(() => {
    const q = this.search.trim().toLowerCase();
    return this.loras.filter((l) => {
      if (this.baseFilter === 'sd1' && l.baseModel !== 'sd1') return false;
      if (this.baseFilter === 'other' && l.baseModel === 'sd1') return false;
      if (this.baseFilter === 'problems' && l.problems.length === 0) return false;
      if (q === '') return true;
      return [l.name, l.alias ?? '', l.folder, ...l.triggerWords].some((t) => t.toLowerCase().includes(q));
    });
  });
  readonly running = $derived(this.job !== null && (this.job.status === 'running' || this.job.status === 'pending'));
  readonly warnings = $derived(regionWarnings(this.regions, this.stack.map((e) => e.key)));
  readonly strategyInfo = $derived(this.info?.strategies.find((s) => s.name === this.form.strategy) ?? null);

  constructor(api: ChorusApi = createApi()) {
    this.api = api;
  }

  async start(): Promise<void> {
    this.api.subscribe((e) => this.#onEvent(e));
    await this.#try('app', async () => {
      const [info, settings, model] = await Promise.all([this.api.call('app.info', {}), this.api.call('settings.get', {}), this.api.call('models.status', {})]);
      this.info = info;
      this.settings = settings;
      this.model = model;
      this.form = { ...this.form, steps: info.defaults.steps, cfgScale: info.defaults.cfgScale, sampler: info.defaults.sampler, scheduleType: info.defaults.scheduleType, width: info.defaults.width, height: info.defaults.height };
      this.modelsDir = settings.modelsDir ?? '';
    });
    if (this.model === null) this.screen = 'models';
    if (this.modelsDir !== '') await this.scanModels();
    await Promise.all([this.refreshLoras(), this.refreshGallery(), this.refreshJobs()]);
  }

  async #try<T>(area: string, fn: () => Promise<T>): Promise<T | undefined> {
    try {
      const r = await fn();
      this.errors = { ...this.errors, [area]: null };
      return r;
    } catch (e) {
      this.errors = { ...this.errors, [area]: asApiError(e) };
      return undefined;
    }
  }

  // ---- models ----

  async scanModels(): Promise<void> {
    if (this.modelsDir.trim() === '') return;
    const scan = await this.#try('models', () => this.api.call('models.scan', { dir: this.modelsDir.trim() }));
    this.modelScan = scan ?? null;
    if (scan !== undefined) await this.#try('settings', async () => (this.settings = await this.api.call('settings.set', { modelsDir: scan.dir })));
  }

  async openModel(path: string): Promise<void> {
    this.opening = true;
    let status: ModelStatus | undefined;
    try {
      status = await this.#try('models', () => this.api.call('models.open', { path }));
    } finally {
      this.opening = false;
    }
    if (status !== undefined) {
      this.model = status;
      this.notice = `Loaded ${status.name}`;
      await this.refreshLoras(true);
    }
  }

  async setLoraDirs(dirs: string[]): Promise<void> {
    const s = await this.#try('settings', () => this.api.call('settings.set', { loraDirs: dirs }));
    if (s !== undefined) {
      this.settings = s;
      await this.refreshLoras(true);
    }
  }

  async setOutputDir(dir: string): Promise<void> {
    const s = await this.#try('settings', () => this.api.call('settings.set', { outputDir: dir }));
    if (s !== undefined) {
      this.settings = s;
      await this.refreshGallery();
    }
  }

  async setDevice(device: Settings['device']): Promise<void> {
    const s = await this.#try('settings', () => this.api.call('settings.set', { device }));
    if (s !== undefined) this.settings = s;
  }

  /**
   * The memory jobs are planned for, as typed ("12G", "16 GiB"; the host reads it, and refuses
   * sizes below 1 GiB in words); empty: all of this machine's. Returns whether it was taken.
   */
  async setMemory(text: string): Promise<boolean> {
    const trimmed = text.trim();
    const s = await this.#try('settings', () => this.api.call('settings.set', { memoryBytes: trimmed === '' ? null : trimmed }));
    if (s === undefined) return false;
    this.settings = s;
    return true;
  }

  // ---- LoRA library ----

  async refreshLoras(refresh = false): Promise<void> {
    const list = await this.#try('loras', () => this.api.call('loras.list', { refresh }));
    if (list === undefined) return;
    this.loras = list;
    for (const l of list) {
      if (l.hasPreview && !(l.path in this.previews)) {
        this.previews[l.path] = null;
        void this.api.call('loras.preview', { path: l.path }).then((p) => (this.previews[l.path] = p.dataUrl), () => undefined);
      }
    }
  }

  cardByPath(path: string): LoraCard | undefined {
    return this.loras.find((l) => l.path === path);
  }

  // ---- stack ----

  addToStack(path: string, index?: number): void {
    const card = this.cardByPath(path);
    if (card === undefined) return;
    if (card.problems.length > 0) {
      this.errors = { ...this.errors, stack: { code: 'UNSUPPORTED_LORA', message: `${card.name} cannot be used: ${card.problems.join(' ')}`, details: { path } } };
      return;
    }
    const next = addEntry({ stack: this.stack, prompt: this.form.prompt }, entryFromCard(card), index);
    this.stack = [...next.stack];
    this.form.prompt = next.prompt;
    this.errors = { ...this.errors, stack: null };
  }

  removeFromStack(key: string): void {
    const next = removeEntry({ stack: this.stack, prompt: this.form.prompt }, key);
    this.stack = [...next.stack];
    this.form.prompt = next.prompt;
    this.regions = this.regions.map((r) => (r.loraKey === key ? { ...r, loraKey: null } : r));
    this.concepts = pruneConcepts(this.concepts, this.form.prompt, this.stack.map((e) => e.key));
  }

  toggleEntry(key: string, enabled: boolean): void {
    const next = setEnabled({ stack: this.stack, prompt: this.form.prompt }, key, enabled);
    this.stack = [...next.stack];
    this.form.prompt = next.prompt;
  }

  moveEntry(key: string, beforeKey: string | null): void {
    this.stack = moveBefore(this.stack, key, beforeKey);
  }

  setWeight(key: string, weight: number, which: 'both' | 'te' | 'unet' = 'both'): void {
    this.stack = setWeight(this.stack, key, weight, which);
  }

  setSplit(key: string, split: boolean): void {
    this.stack = setSplit(this.stack, key, split);
  }

  toggleConcept(word: string): void {
    if (this.conceptOwner === null) return;
    this.concepts = toggleConceptWord(this.concepts, this.conceptOwner, word);
  }

  // ---- regions ----

  addRegion(box: Box, kind: Region['kind'] = 'box'): Region {
    const region: Region = { id: newKey(), kind, box, prompt: '', loraKey: null, color: nextColor(this.regions) };
    this.regions = [...this.regions, region];
    this.selectedRegion = region.id;
    return region;
  }

  updateRegion(id: string, change: Partial<Omit<Region, 'id'>>): void {
    this.regions = this.regions.map((r) => (r.id === id ? { ...r, ...change } : r));
  }

  deleteRegion(id: string): void {
    this.regions = this.regions.filter((r) => r.id !== id);
    this.masks = Object.fromEntries(Object.entries(this.masks).filter(([k]) => k !== id));
    this.maskViews = Object.fromEntries(Object.entries(this.maskViews).filter(([k]) => k !== id));
    if (this.selectedRegion === id) this.selectedRegion = null;
  }

  setSize(width: number, height: number): void {
    if (width === this.form.width && height === this.form.height) return;
    this.regions = refitRegions(this.regions, this.form.width, this.form.height, width, height);
    this.form.width = width;
    this.form.height = height;
  }

  // ---- generate ----

  jobPayload(form: GenerationForm = this.form, stack: readonly StackEntry[] = this.stack): JobPayload {
    const loraOf = (key: string) => {
      const e = stack.find((x) => x.key === key);
      return e === undefined ? undefined : { name: e.name, te: e.te, unet: e.unet };
    };
    const regions = this.regions.length === 0 ? [] : regionsPayload(this.regions, loraOf, this.masks);
    const base = formPayload(form);
    const { loras, concepts } = compositionPayload({
      strategy: form.strategy,
      prompt: form.prompt,
      stack,
      regionLoras: this.regions.map((r) => r.loraKey),
      regionPrompts: this.regions.map((r) => r.prompt),
      concepts: this.concepts,
    });
    const strategy = concepts === undefined ? base.strategy : { ...base.strategy!, concepts };
    return { ...base, strategy, loras, ...(regions.length === 0 ? {} : { regions }) };
  }

  async generate(): Promise<void> {
    if (this.running) return;
    if (this.form.seedMode === 'random') this.form.seed = randomSeed();
    const payload = { ...this.jobPayload(), seed: this.form.seed };
    this.preview = null;
    this.fraction = 0;
    this.step = 0;
    const r = await this.#try('generate', () => this.api.call('jobs.generate', { job: payload }));
    if (r === undefined) return;
    this.jobId = r.id;
    this.lastSeed = r.seed;
    this.job = { id: r.id, status: 'pending', prompt: payload.prompt, seed: r.seed, strategy: this.form.strategy, fraction: 0, images: [], error: null, createdAt: Date.now(), plan: null };
  }

  async cancel(): Promise<void> {
    if (this.jobId === null || !this.running) return;
    await this.#try('generate', () => this.api.call('jobs.cancel', { id: this.jobId! }));
  }

  reuseSeed(seed: string | null = this.lastSeed): void {
    if (seed === null) return;
    this.form.seedMode = 'fixed';
    this.form.seed = seed;
  }

  #onEvent(e: ApiEvent): void {
    if (e.type === 'job.status') {
      this.jobs = [e.job, ...this.jobs.filter((j) => j.id !== e.id)];
      if (e.id === this.jobId) {
        this.job = e.job;
        if (e.job.status === 'done') this.fraction = 1;
        if (e.job.status === 'failed') this.errors = { ...this.errors, generate: e.job.error };
      }
      const cell = this.compareCells.find((c) => c.jobId === e.id);
      if (cell !== undefined && e.job.status === 'failed') cell.error = e.job.error;
      if (cell !== undefined && e.job.status === 'done') cell.fraction = 1;
      return;
    }
    if (e.type === 'job.progress') {
      if (e.id === this.jobId) {
        this.fraction = Math.max(this.fraction, e.fraction);
        this.step = e.step;
        this.steps = e.steps;
        if (e.preview !== null) this.preview = e.preview;
      }
      const cell = this.compareCells.find((c) => c.jobId === e.id);
      if (cell !== undefined) cell.fraction = Math.max(cell.fraction, e.fraction);
      return;
    }
    // job.image
    this.gallery = [e.item, ...this.gallery.filter((g) => g.file !== e.item.file)];
    void this.thumbOf(e.item.file).then((t) => {
      if (e.id === this.jobId) this.lastImage = t;
      const cell = this.compareCells.find((c) => c.jobId === e.id);
      if (cell !== undefined) {
        cell.file = e.item.file;
        cell.thumb = t;
      }
    });
  }

  // ---- gallery ----

  async refreshGallery(): Promise<void> {
    const list = await this.#try('gallery', () => this.api.call('gallery.list', { limit: 200 }));
    if (list !== undefined) this.gallery = list;
  }

  async thumbOf(file: string): Promise<string | null> {
    const have = this.thumbs[file];
    if (have !== undefined) return have;
    const r = await this.#try('gallery', () => this.api.call('gallery.image', { file, thumbnail: true }));
    if (r === undefined) return null;
    this.thumbs[file] = r.dataUrl;
    return r.dataUrl;
  }

  async selectImage(file: string): Promise<void> {
    this.selectedImage = file;
    this.fullImage = null;
    const r = await this.#try('gallery', () => this.api.call('gallery.image', { file }));
    if (r !== undefined && this.selectedImage === file) this.fullImage = r.dataUrl;
  }

  /** Load a dropped or picked image file's settings (Chorus, A1111, ComfyUI PNGs). */
  async loadImageFile(file: File): Promise<void> {
    const bytes = new Uint8Array(await file.arrayBuffer());
    let binary = '';
    const CHUNK = 0x8000;
    for (let i = 0; i < bytes.length; i += CHUNK) binary += String.fromCharCode(...bytes.subarray(i, i + CHUNK));
    const loaded = await this.#try('drop', () => this.api.call('gallery.readMetadata', { png: btoa(binary), name: file.name }));
    this.loaded = loaded ?? null;
  }

  /** "Reuse settings": the whole job back into the form, the stack and the regions. */
  applyJob(job: JobPayload): void {
    this.form = formFromPayload(job, this.form);
    const stack: StackEntry[] = [];
    for (const l of job.loras ?? []) {
      const card = this.loras.find((c) => c.name === l.name || c.alias === l.name || c.path === l.name);
      stack.push({ key: newKey(), name: card?.name ?? l.name, path: card?.path ?? null, te: l.te, unet: l.unet, split: l.te !== l.unet, enabled: true, triggerWords: card?.triggerWords.slice(0, 3) ?? [] });
    }
    // Concept and region LoRAs are not job LoRAs (they act in their slot or region only): they join
    // the stack too, found again by name when the same LoRA is also a job LoRA.
    const entryFor = (l: { name: string; te: number; unet: number }, reuse: boolean): string => {
      const same = reuse ? stack.find((e) => e.name === l.name && e.te === l.te && e.unet === l.unet) : undefined;
      if (same !== undefined) return same.key;
      const card = this.loras.find((x) => x.name === l.name || x.alias === l.name || x.path === l.name);
      const key = newKey();
      stack.push({ key, name: card?.name ?? l.name, path: card?.path ?? null, te: l.te, unet: l.unet, split: l.te !== l.unet, enabled: true, triggerWords: card?.triggerWords.slice(0, 3) ?? [] });
      return key;
    };
    const conceptKeys = (job.strategy?.name === 'clora' ? (job.strategy.concepts ?? []) : []).map((c) => (c.lora === undefined ? null : entryFor(c.lora, false)));
    const boxes = (job.regions ?? []).filter((r) => r.box !== undefined);
    const regionKeys = boxes.map((r) => (r.lora === undefined ? null : entryFor(r.lora, true)));
    this.stack = stack;
    const missing = stack.filter((e) => e.path === null).map((e) => e.name);
    this.notice = missing.length > 0 ? `Settings loaded; not in your LoRA library: ${missing.join(', ')}` : 'Settings loaded';
    this.regions = boxes.map((r, i) => ({ id: newKey(), kind: 'box' as const, box: r.box!, prompt: r.prompt, loraKey: regionKeys[i] ?? null, color: nextColor(this.regions.slice(0, i)) }));
    const strategy = job.strategy?.name ?? 'plain';
    this.concepts = conceptsFromJob(strategy, job.strategy?.concepts ?? [], (i) => (strategy === 'clora' ? (conceptKeys[i] ?? null) : (regionKeys[i] ?? null)));
    this.masks = {};
    this.maskViews = {};
    this.screen = 'create';
  }

  // ---- compare ----

  async runCompare(): Promise<void> {
    const seed = this.form.seedMode === 'fixed' && /^\d+$/.test(this.form.seed) ? this.form.seed : randomSeed();
    this.reuseSeed(seed);
    const variants: Array<{ label: string; payload: JobPayload }> = [];
    if (this.compareMode === 'strategies') {
      for (const name of this.compareStrategies) {
        const form = { ...this.form, strategy: name as GenerationForm['strategy'], knobs: name === this.form.strategy ? this.form.knobs : {} };
        variants.push({ label: name, payload: { ...this.jobPayload(form), seed } });
      }
    } else {
      const key = this.compareLora ?? this.stack[0]?.key ?? null;
      const weights = this.compareWeights.split(',').map((w) => Number(w.trim())).filter((w) => Number.isFinite(w));
      const entry = this.stack.find((e) => e.key === key);
      if (entry === undefined || weights.length === 0) {
        this.errors = { ...this.errors, compare: { code: 'BAD_PAYLOAD', message: 'Pick a LoRA of the stack and list weights, e.g. 0, 0.5, 1.', details: { field: 'compare' } } };
        return;
      }
      for (const w of weights) variants.push({ label: `${entry.name} ${w}`, payload: { ...this.jobPayload(this.form, setWeight(this.stack, entry.key, w)), seed } });
    }
    this.errors = { ...this.errors, compare: null };
    this.compareCells = variants.map((v) => ({ label: v.label, jobId: null, file: null, thumb: null, error: null, fraction: 0 }));
    for (const [i, v] of variants.entries()) {
      try {
        const r = await this.api.call('jobs.generate', { job: v.payload });
        this.compareCells[i]!.jobId = r.id;
      } catch (e) {
        this.compareCells[i]!.error = asApiError(e);
      }
    }
  }

  // ---- queue ----

  async refreshJobs(): Promise<void> {
    const list = await this.#try('queue', () => this.api.call('jobs.list', {}));
    if (list !== undefined) this.jobs = list;
  }

  async cancelJob(id: string): Promise<void> {
    await this.#try('queue', () => this.api.call('jobs.cancel', { id }));
  }

  /** The durable batch queue (`chorus batch`): other processes run it, so the screen polls. */
  async refreshBatchQueue(): Promise<void> {
    const view = await this.#try('batch', () => this.api.call('queue.list', {}));
    if (view !== undefined) this.batchQueue = view;
  }

  async controlBatchJob(action: 'cancel' | 'pause' | 'resume' | 'retry', id: number): Promise<void> {
    await this.#try('batch', () => this.api.call('queue.control', { action, ids: [id] }));
    await this.refreshBatchQueue();
  }
}
