//! The storm as a picture (`plotters`): per class, success and p99 per second for both runs,
//! the fault phase shaded, and each class's breaker state as a band along the top.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use tower_degrade::BoxError;
use tower_degrade::breaker::State;

use crate::storm::{CLASSES, Outcome, Run};

const BIN_MS: u32 = 1000;

fn state_color(s: State) -> RGBColor {
    match s {
        State::Open | State::ForcedOpen => RGBColor(215, 60, 60),
        State::HalfOpen => RGBColor(240, 150, 40),
        State::Recovering => RGBColor(235, 210, 60),
        State::Degraded => RGBColor(80, 120, 220),
        // Closed, disabled, metrics-only: serving.
        _ => RGBColor(120, 190, 120),
    }
}

/// Points of a line: seconds, value.
type Line = Vec<(f64, f64)>;

/// Per second: the share of calls served by the service, and the p99 latency (ms).
fn series(run: &Run, class: usize) -> (Line, Line) {
    let secs = run.phases.end.div_ceil(BIN_MS) as usize;
    let mut bins: Vec<Vec<(u32, bool)>> = vec![Vec::new(); secs];
    for x in run.samples.iter().filter(|x| usize::from(x.class) == class) {
        let b = (x.at_ms / BIN_MS) as usize;
        if b < secs {
            bins[b].push((x.latency_us, x.outcome == Outcome::Ok));
        }
    }
    let mut success = Vec::new();
    let mut p99 = Vec::new();
    for (i, b) in bins.iter_mut().enumerate() {
        if b.is_empty() {
            continue;
        }
        let t = i as f64 + 0.5;
        let ok = b.iter().filter(|(_, ok)| *ok).count();
        success.push((t, 100.0 * ok as f64 / b.len() as f64));
        b.sort_unstable();
        let k = ((b.len() as f64 * 0.99).ceil() as usize).clamp(1, b.len()) - 1;
        p99.push((t, f64::from(b[k].0) / 1000.0));
    }
    (success, p99)
}

/// Draw both runs into `path` (PNG).
pub(crate) fn draw(unprotected: &Run, protected: &Run, path: &Path) -> Result<(), BoxError> {
    // Text needs a font; the bundled DejaVu Sans is used, whatever the machine has.
    register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| "cannot load the bundled font")?;
    let rows = CLASSES.len() as u32;
    let root = BitMapBackend::new(path, (1600, 230 * rows + 60)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(60);
    title.draw(&Text::new(
        "The storm: success (%) and p99 (ms, right axis) per second; fault phase shaded; breaker state along the top",
        (20, 20),
        ("sans-serif", 22).into_font(),
    ))?;
    let cells = body.split_evenly((CLASSES.len(), 2));
    let end = f64::from(protected.phases.end) / 1000.0;
    for (i, cell) in cells.iter().enumerate() {
        let (class, col) = (i / 2, i % 2);
        // One p99 scale per class, shared by both runs.
        let max_p99 = [unprotected, protected]
            .iter()
            .flat_map(|r| series(r, class).1)
            .map(|(_, v)| v)
            .fold(10.0f64, f64::max)
            * 1.1;
        let run = if col == 0 { unprotected } else { protected };
        let label = format!(
            "{} - {}",
            CLASSES[class],
            if run.protected {
                "protected"
            } else {
                "unprotected"
            }
        );
        let mut chart = ChartBuilder::on(cell)
            .caption(label, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(44)
            .right_y_label_area_size(54)
            .build_cartesian_2d(0.0..end, 0.0..105.0)?
            .set_secondary_coord(0.0..end, 0.0..max_p99);
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("s")
            .y_desc("success %")
            .label_style(("sans-serif", 12))
            .draw()?;
        chart
            .configure_secondary_axes()
            .y_desc("p99 ms")
            .label_style(("sans-serif", 12))
            .draw()?;
        let (f0, f1) = (
            f64::from(run.phases.fault_start) / 1000.0,
            f64::from(run.phases.fault_end) / 1000.0,
        );
        chart.draw_series(std::iter::once(Rectangle::new(
            [(f0, 0.0), (f1, 105.0)],
            RGBColor(235, 235, 235).filled(),
        )))?;
        // The breaker state, sampled every 50 ms, as a band along the top.
        let states: Vec<_> = run
            .states
            .iter()
            .filter(|x| usize::from(x.class) == class)
            .collect();
        chart.draw_series(states.windows(2).map(|w| {
            let (a, b) = (
                f64::from(w[0].at_ms) / 1000.0,
                f64::from(w[1].at_ms) / 1000.0,
            );
            Rectangle::new([(a, 100.5), (b, 104.5)], state_color(w[0].state).filled())
        }))?;
        let (success, p99) = series(run, class);
        chart.draw_series(LineSeries::new(success, BLUE.stroke_width(2)))?;
        chart.draw_secondary_series(LineSeries::new(p99, RED.stroke_width(1)))?;
    }
    root.present()?;
    Ok(())
}
