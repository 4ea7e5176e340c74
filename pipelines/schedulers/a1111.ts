/**
 * Sampler names users bring from AUTOMATIC1111 (infotexts, UI) and ComfyUI → the scheduler Chorus
 * runs, and the name to write back into an A1111 infotext.
 *
 * A1111 (≥ 1.9) names a sampler and a schedule type separately ("DPM++ 2M" + "Karras"); older
 * versions folded Karras into the name ("DPM++ 2M Karras", "LMS Karras"). Both forms are read, the
 * way A1111's `get_sampler_and_scheduler` does: a schedule suffix on the name wins. "Automatic" (also
 * what A1111 assumes when an infotext has no "Schedule type") means the sampler's own default, which
 * for "DPM++ 2M" is Karras since 1.9 (`{'scheduler': 'karras'}` in sd_samplers_kdiffusion.py) and
 * uniform for the rest. ComfyUI's `sampler_name` + `scheduler` ("dpmpp_2m" + "karras") are read too;
 * its default scheduler is "normal" (uniform).
 *
 * Only combinations Chorus implements map; everything else is `UNKNOWN_SAMPLER` listing the valid
 * names. The mapping picks the diffusers scheduler those UIs' samplers correspond to; it does not
 * reproduce their exact σ grids (k-diffusion's "Uniform" spaces σ over t like diffusers' `linspace`,
 * A1111/ComfyUI UniPC default to the bh1 variant where Chorus runs bh2, ComfyUI's "ddim" is an Euler
 * sampler on the DDIM grid).
 */
import { PipelineError } from '../errors.ts';
import type { SchedulerKind, SchedulerOptions } from './types.ts';

/** What to write back as "Sampler: …, Schedule type: …" in an A1111 infotext. */
export interface InfotextSampler {
  readonly sampler: string;
  readonly scheduleType: 'Automatic' | 'Uniform' | 'Karras';
}

export interface SamplerChoice {
  readonly kind: SchedulerKind;
  readonly options: SchedulerOptions;
  readonly infotext: InfotextSampler;
}

interface SamplerEntry {
  readonly kind: SchedulerKind;
  /** A1111's display name (written back into infotexts). */
  readonly a1111: string;
  /** Other spellings: A1111's aliases (`k_…`), ComfyUI's `sampler_name`. */
  readonly aliases: readonly string[];
  readonly karrasCapable: boolean;
  /** A1111 ≥ 1.9: "Automatic" means Karras for this sampler. */
  readonly a1111AutomaticIsKarras: boolean;
}

const SAMPLERS: readonly SamplerEntry[] = [
  { kind: 'euler_ancestral', a1111: 'Euler a', aliases: ['k_euler_a', 'k_euler_ancestral', 'euler_ancestral'], karrasCapable: true, a1111AutomaticIsKarras: false },
  { kind: 'euler', a1111: 'Euler', aliases: ['k_euler', 'euler'], karrasCapable: true, a1111AutomaticIsKarras: false },
  { kind: 'lms', a1111: 'LMS', aliases: ['k_lms', 'lms'], karrasCapable: true, a1111AutomaticIsKarras: false },
  { kind: 'heun', a1111: 'Heun', aliases: ['k_heun', 'heun'], karrasCapable: true, a1111AutomaticIsKarras: false },
  { kind: 'dpmpp_2m', a1111: 'DPM++ 2M', aliases: ['k_dpmpp_2m', 'dpmpp_2m'], karrasCapable: true, a1111AutomaticIsKarras: true },
  { kind: 'ddim', a1111: 'DDIM', aliases: ['ddim'], karrasCapable: false, a1111AutomaticIsKarras: false },
  { kind: 'pndm', a1111: 'PLMS', aliases: ['plms'], karrasCapable: false, a1111AutomaticIsKarras: false },
  { kind: 'unipc', a1111: 'UniPC', aliases: ['unipc', 'uni_pc', 'uni_pc_bh2'], karrasCapable: false, a1111AutomaticIsKarras: false },
];

/** A1111's names for the samplers Chorus implements. */
export const A1111_SAMPLERS: readonly string[] = SAMPLERS.map((s) => s.a1111);
/** A1111 schedule types Chorus implements. */
export const A1111_SCHEDULE_TYPES: readonly string[] = ['Automatic', 'Uniform', 'Karras'];
/** ComfyUI `sampler_name`s Chorus implements. */
export const COMFY_SAMPLERS: readonly string[] = ['euler', 'euler_ancestral', 'lms', 'heun', 'dpmpp_2m', 'ddim', 'uni_pc', 'uni_pc_bh2'];
/** ComfyUI `scheduler`s Chorus implements ("ddim_uniform" only with ddim). */
export const COMFY_SCHEDULERS: readonly string[] = ['normal', 'karras', 'ddim_uniform'];

type Schedule = 'automatic' | 'uniform' | 'karras';

/** Lower-case schedule spellings of both UIs → meaning. */
const SCHEDULE_NAMES: Readonly<Record<string, Schedule>> = {
  automatic: 'automatic',
  uniform: 'uniform',
  normal: 'uniform',
  ddim_uniform: 'uniform',
  karras: 'karras',
};

function normalize(name: string): string {
  return name.trim().replace(/\s+/g, ' ').toLowerCase();
}

function findSampler(name: string): SamplerEntry | undefined {
  return SAMPLERS.find((s) => normalize(s.a1111) === name || s.aliases.includes(name));
}

function validSamplerList(): string {
  return `A1111: ${A1111_SAMPLERS.join(', ')} (schedule types ${A1111_SCHEDULE_TYPES.join(', ')}; Karras for ${SAMPLERS.filter((s) => s.karrasCapable).map((s) => s.a1111).join(', ')}; old names like "DPM++ 2M Karras", "LMS Karras" too); ComfyUI: ${COMFY_SAMPLERS.join(', ')} with ${COMFY_SCHEDULERS.join(', ')}`;
}

/**
 * Map a sampler name and optional schedule type (A1111 or ComfyUI spelling, case-insensitive) to a
 * scheduler kind and options. Undefined `scheduleType` means "Automatic".
 * Throws `PipelineError('UNKNOWN_SAMPLER')` listing the valid names for an unknown sampler, an
 * unknown schedule type, or a combination Chorus does not implement (Karras with DDIM/PLMS/UniPC).
 */
export function resolveSampler(sampler: string, scheduleType?: string): SamplerChoice {
  let name = normalize(sampler);
  const scheduleName = scheduleType === undefined ? 'automatic' : normalize(scheduleType);
  let schedule: Schedule | undefined = SCHEDULE_NAMES[scheduleName];
  if (schedule === undefined) {
    throw new PipelineError(
      'UNKNOWN_SAMPLER',
      `Schedule type "${scheduleType}" is not one Chorus implements; use ${A1111_SCHEDULE_TYPES.join(', ')} (ComfyUI: ${COMFY_SCHEDULERS.join(', ')}).`,
      { scheduleType, valid: [...A1111_SCHEDULE_TYPES, ...COMFY_SCHEDULERS] },
    );
  }
  // Old combined names: "<sampler> Karras" (the suffix wins, as in A1111).
  let entry = findSampler(name);
  if (entry === undefined && name.endsWith(' karras')) {
    name = name.slice(0, -' karras'.length);
    entry = findSampler(name);
    schedule = 'karras';
  }
  if (entry === undefined) {
    throw new PipelineError('UNKNOWN_SAMPLER', `Sampler "${sampler}" is not one Chorus implements. Valid names: ${validSamplerList()}.`, {
      sampler,
      valid: [...A1111_SAMPLERS, ...COMFY_SAMPLERS],
    });
  }
  if (scheduleName === 'ddim_uniform' && entry.kind !== 'ddim') {
    throw new PipelineError('UNKNOWN_SAMPLER', `Schedule "ddim_uniform" goes with the ddim sampler, not "${sampler}"; use normal or karras.`, {
      sampler,
      scheduleType,
      valid: ['normal', 'karras'],
    });
  }
  const isA1111Name = normalize(entry.a1111) === name || name.startsWith('k_');
  const karras = schedule === 'karras' || (schedule === 'automatic' && isA1111Name && entry.a1111AutomaticIsKarras);
  if (karras && !entry.karrasCapable) {
    throw new PipelineError(
      'UNKNOWN_SAMPLER',
      `${entry.a1111} has no Karras schedule in Chorus (it steps on timesteps, not a σ grid); use schedule type Automatic or Uniform, or a Karras-capable sampler: ${SAMPLERS.filter((s) => s.karrasCapable).map((s) => s.a1111).join(', ')}.`,
      { sampler, scheduleType, valid: ['Automatic', 'Uniform'] },
    );
  }
  return {
    kind: entry.kind,
    options: entry.karrasCapable ? { karrasSigmas: karras } : {},
    infotext: { sampler: entry.a1111, scheduleType: !entry.karrasCapable ? 'Automatic' : karras ? 'Karras' : 'Uniform' },
  };
}
